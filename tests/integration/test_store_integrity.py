"""No corrupt file poisons the store: a truncated row file is skipped with a warning and its
cell recomputed; a truncated checkpoint or key is detected by its content hash, named, and
recomputed; `harness check` lists both and `--repair` removes them."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from integration_support import result_files, tiny_scenario_dict

from harness import cli, scheduler
from harness.artifacts import ArtifactStore
from harness.config import parse_scenario
from harness.errors import CorruptFile
from harness.grid import expand_cells
from results import load
from results.store import StoreWarning, ok_cell_ids

# 2 methods x 2 attacks = 4 cells on one victim (plus two null victims for trigger_set).
SCENARIO = tiny_scenario_dict(
    name="integrity", attacks=["identity", {"name": "prune", "params": {"sparsity": 0.3}}]
)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def stored(ray_session, tmp_path):
    """A finished store of the scenario: (scenario, cells, store path)."""
    scenario = parse_scenario(SCENARIO)
    cells = expand_cells(scenario)
    store = tmp_path / "store"
    summary = scheduler.run_cells(cells, str(store), resources=scenario.resources)
    assert (summary.ok, summary.failed) == (len(cells), 0), summary.failures
    return scenario, cells, store


def _run(scenario, cells, store) -> scheduler.RunSummary:
    return scheduler.run_cells(cells, str(store), resources=scenario.resources)


def test_truncated_row_is_skipped_with_a_warning_then_recomputed(stored, capsys):
    scenario, cells, store = stored
    victim_cell = cells[0].cell_id
    path = result_files(store)[victim_cell]
    _truncate(path)
    with pytest.warns(StoreWarning, match=r"skipped 1 unreadable") as caught:
        df = load(str(store))
    assert str(path) in str(caught[0].message)
    assert len(df) == len(cells) - 1 and victim_cell not in set(df["cell_id"])
    with pytest.warns(StoreWarning):
        assert victim_cell not in ok_cell_ids(str(store))
    with pytest.warns(StoreWarning):
        assert cli.main(["show", str(store)]) == 0  # the table of the readable rows

    with pytest.warns(StoreWarning):
        summary = _run(scenario, cells, store)
    assert (summary.skipped, summary.ok, summary.failed) == (len(cells) - 1, 1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreWarning)  # the bad file was replaced
        df = load(str(store))
    assert len(df) == len(cells) and (df["status"] == "ok").all()


def test_truncated_checkpoint_is_named_on_load_and_recomputed(stored):
    """The victim's model.pt cut in half: loading names the file; the next run's cells (rows
    removed) recompute the victim instead of failing on it."""
    scenario, cells, store = stored
    artifacts = ArtifactStore(str(store))
    victim_meta = artifacts.load_meta("train_victim", cells[0].victim_key())
    model = store / "artifacts" / "train_victim" / cells[0].victim_key() / "model.pt"
    _truncate(model)
    with pytest.raises(CorruptFile, match="content hash mismatch") as err:
        artifacts.load_state(victim_meta)
    assert str(model) in str(err.value)

    for path in result_files(store).values():  # every cell runs again
        path.unlink()
    summary = _run(scenario, cells, store)
    assert (summary.ok, summary.failed) == (len(cells), 0), summary.failures
    fresh = artifacts.load_meta("train_victim", cells[0].victim_key())
    artifacts.load_state(fresh)  # intact again
    assert fresh["model_sha256"] == victim_meta["model_sha256"]  # same seeded training


def test_harness_check_lists_and_repairs(stored, capsys):
    scenario, cells, store = stored
    row = result_files(store)[cells[1].cell_id]
    _truncate(row)
    marked = next(
        m for m in (store / "artifacts" / "embed").glob("*/meta.json")
        if json.loads(m.read_text()).get("secret_sha256")
    )
    key = marked.parent / "key.pt"
    key.write_bytes(key.read_bytes()[:-10] + b"0123456789")  # altered, same size
    (store / "results" / ".x.parquet.0a1b.tmp").write_bytes(b"half")
    os.utime(store / "results" / ".x.parquet.0a1b.tmp", (0, 0))  # left by a crash long ago

    assert cli.main(["check", str(store)]) == 1
    out = capsys.readouterr().out
    assert str(row) in out and str(key) in out and ".x.parquet.0a1b.tmp" in out
    assert "1 unreadable" in out and "1 bad" in out

    assert cli.main(["check", str(store), "--repair"]) == 0
    assert not row.exists() and not marked.exists()
    assert cli.main(["check", str(store)]) == 0
    assert "0 unreadable" in capsys.readouterr().out

    summary = _run(scenario, cells, store)  # what was removed is recomputed
    assert (summary.skipped, summary.ok, summary.failed) == (len(cells) - 1, 1, 0)
    df = load(str(store))
    assert len(df) == len(cells) and (df["status"] == "ok").all()
