"""Secrets stay secret: a trigger set cannot be regenerated from the fields every row prints
(seed, method_params), yet reruns on the same store reproduce it exactly; keys and the owner
secret are private files, and neither the secret nor the seeds derived from it reach a row
or a manifest."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import torch
from integration_support import tiny_scenario_dict

from harness import scheduler
from harness.artifacts import OWNER_SECRET, ArtifactStore
from harness.config import parse_scenario
from harness.grid import expand_cells
from harness.methods.trigger_set import make_triggers
from harness.stages import run_cell
from results import load

SCENARIO = tiny_scenario_dict(
    name="secrets", methods=[{"name": "trigger_set", "params": {"n_keys": 20, "n_null": 2}}]
)


def _cell():
    (cell,) = expand_cells(parse_scenario(SCENARIO))
    return cell


def _key(store: Path, cell) -> dict:
    return ArtifactStore(str(store)).load_secret(
        ArtifactStore(str(store)).load_meta("embed", cell.embed_key())
    )


def test_keys_not_derivable_from_rows_reproducible_per_store_and_private(ray_session, tmp_path):
    scenario = parse_scenario(SCENARIO)
    (cell,) = cells = expand_cells(scenario)
    store = tmp_path / "store"
    summary = scheduler.run_cells(cells, str(store), resources=scenario.resources)
    assert summary.ok == 1, summary.failures
    (row,) = load(str(store)).to_dict("records")
    key = _key(store, cell)

    # Everything a row holder knows: the seed and the method's parameters.
    params = json.loads(row["method_params"])
    d = SCENARIO["dataset"]
    for guess in (row["seed"] + 7919, *range(0, 500)):  # 7919: the old rule
        x, _ = make_triggers(
            params["n_keys"], d["channels"], d["image_size"], 10, params["pattern"], guess
        )
        assert not torch.equal(x, key["x"]), f"trigger set regenerated from seed {guess}"

    # Private files; neither the owner secret nor a seed derived from it in anything public.
    secret = store / OWNER_SECRET
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    keys = list((store / "artifacts").rglob("key.pt"))
    assert keys and all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    owner_hex = secret.read_text().strip()
    seed = str(ArtifactStore(str(store)).owner_seed("embed", cell.embed_key()))
    public = [*store.joinpath("results").rglob("*.parquet"), *store.joinpath("runs").glob("*")]
    public += list((store / "artifacts").rglob("meta.json"))
    for path in public:
        data = path.read_bytes()
        assert owner_hex.encode() not in data and seed.encode() not in data, path

    # The same store reproduces it: artifacts and rows gone, the owner secret kept.
    shutil.rmtree(store / "artifacts")
    shutil.rmtree(store / "results")
    run_cell(cell, str(store))
    again = _key(store, cell)
    assert torch.equal(again["x"], key["x"]) and torch.equal(again["y"], key["y"])

    # Another store (another owner) gets other keys for the very same cell.
    other = tmp_path / "other"
    (other / OWNER_SECRET).parent.mkdir(parents=True)
    (other / OWNER_SECRET).write_text("ab" * 32)  # (the suite fixes the secret it would make)
    run_cell(cell, str(other))
    assert not torch.equal(_key(other, cell)["x"], key["x"])
