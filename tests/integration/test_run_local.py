"""The smoke scenario, cut to LeNet and three attacks, through the session's local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from integration_support import result_files, stored_cell_ids

from harness import scheduler
from harness.config import ComponentCfg
from harness.grid import expand_cells, load_scenario
from results import load

SMOKE = Path(__file__).resolve().parents[2] / "scenarios" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(ray_session, tmp_path_factory):
    """smoke.yaml on LeNet with identity, prune and quantize: 2 methods x 3 attacks = 6 cells."""
    scenario = load_scenario(SMOKE).model_copy(
        update={
            "archs": ["lenet"],
            "attacks": [
                ComponentCfg(name="identity"),
                ComponentCfg(name="prune", params={"sparsity": 0.3}),
                ComponentCfg(name="quantize", params={"bits": 8}),
            ],
        }
    )
    cells = expand_cells(scenario)
    store = str(tmp_path_factory.mktemp("smoke-store"))
    summary = scheduler.run_cells(
        cells, store, resources=scenario.resources, max_retries=scenario.max_retries
    )
    return scenario, cells, store, summary


def test_every_cell_has_one_ok_row(smoke_run):
    _, cells, store, summary = smoke_run
    assert (summary.total, summary.skipped, summary.ok, summary.failed) == (6, 0, 6, 0)
    df = load(store)
    assert len(df) == len(cells)
    assert df["cell_id"].is_unique
    assert set(df["cell_id"]) == {c.cell_id for c in cells}
    assert sorted(stored_cell_ids(store)) == sorted(c.cell_id for c in cells)
    assert set(result_files(store)) == {c.cell_id for c in cells}
    assert (df["status"] == "ok").all(), df[["method", "attack", "error"]]
    assert df["error"].isna().all()
    assert set(df["run_id"]) == {summary.run_id}
    assert set(df["scenario"]) == {"smoke"} and set(df["arch"]) == {"lenet"}
    assert set(df["device"]) == {"cpu"}
    assert df["task_score_attacked"].between(0, 1).all()


def test_manifest_and_artifacts(smoke_run):
    _, cells, store, summary = smoke_run
    manifest = json.loads(Path(store, "runs", f"{summary.run_id}.json").read_text())
    assert manifest["run_id"] == summary.run_id
    assert manifest["cells"] == 6 and manifest["ok"] == 6 and manifest["failed"] == 0
    assert manifest["interrupted"] is False and "finished_at" in manifest
    assert manifest["versions"]["harness"]
    artifacts = Path(store, "artifacts")
    victims = {job.key for c in cells for job in c.embed_job().deps if job.stage == "train_victim"}
    # Deduplicated DAG: 1 victim + 3 null models, 2 embeddings, 6 attacks.
    assert {p.name for p in (artifacts / "train_victim").iterdir()} == victims
    assert len(victims) == 4
    assert {p.name for p in (artifacts / "embed").iterdir()} == {c.embed_key() for c in cells}
    assert {p.name for p in (artifacts / "attack").iterdir()} == {c.attack_key() for c in cells}
    for c in cells:
        assert (artifacts / "train_victim" / c.victim_key() / "model.pt").is_file()
        assert (artifacts / "embed" / c.embed_key() / "meta.json").is_file()
        assert (artifacts / "attack" / c.attack_key() / "meta.json").is_file()
        if c.method == "trigger_set":
            assert (artifacts / "embed" / c.embed_key() / "key.pt").is_file()


def test_trigger_set_detected_and_none_not(smoke_run):
    store = smoke_run[2]
    df = load(store)
    marked = df[df["method"] == "trigger_set"]
    assert len(marked) == 3
    assert (marked["wm_metric"] == "trigger_acc").all()
    assert (marked["wm_score_marked"] > marked["wm_threshold"]).all()
    identity = marked[marked["attack"] == "identity"].iloc[0]
    assert bool(identity["wm_detected"]) is True
    assert identity["wm_score_attacked"] == identity["wm_score_marked"]
    assert identity["metrics"]["wm_detected_marked"] == 1.0
    unmarked = df[df["method"] == "none"]
    assert len(unmarked) == 3
    assert not unmarked["wm_detected"].any()
    assert unmarked["wm_score_marked"].isna().all()


def test_second_run_does_no_work(smoke_run):
    scenario, cells, store, first = smoke_run
    files = {cid: p.stat().st_mtime_ns for cid, p in result_files(store).items()}
    manifests = set(Path(store, "runs").iterdir())
    again = scheduler.run_cells(cells, store, resources=scenario.resources)
    assert (again.total, again.skipped, again.ok, again.failed) == (6, 6, 0, 0)
    assert set(Path(store, "runs").iterdir()) == manifests  # no new run recorded
    assert {cid: p.stat().st_mtime_ns for cid, p in result_files(store).items()} == files
    assert set(load(store)["run_id"]) == {first.run_id}


def test_report_of_the_run_reads_the_store_alone(smoke_run, tmp_path):
    """The driver stores the plug-in declarations; the report then needs only the store, and
    the trigger set's null models give its ROC real negatives (one score per null model)."""
    import pandas as pd

    from harness.attacks import ATTACKS
    from harness.cli import store_sections
    from harness.methods import METHODS
    from results.reporting import build
    from results.store import read_sections

    scenario, cells, store, _ = smoke_run
    store_sections(store)
    plugins, _ = read_sections(store, scenario.name)
    assert set(plugins) == {f"method-{m}" for m in METHODS.list()} | {
        f"attack-{a}" for a in ATTACKS.list()
    }
    page = build(store, out=tmp_path / "report")
    assert page.read_text().count("<img") >= 2  # the heatmap and the Pareto view
    sep = pd.read_csv(tmp_path / "report" / "tables" / f"{scenario.name}.separability.csv")
    n_null = next(c for c in cells if c.method == "trigger_set").method_params["n_null"]
    seeds = len({c.seed for c in cells})
    assert (sep["negatives"] == n_null * seeds).all() and (sep["positives"] == seeds).all()
    assert sep["auc"].between(0, 1).all()
    decision = pd.read_csv(tmp_path / "report" / "tables" / f"{scenario.name}.decision.csv")
    assert set(decision["attack_label"]) == {"identity", "prune", "quantize"}
    assert (decision["failed"] == 0).all()
