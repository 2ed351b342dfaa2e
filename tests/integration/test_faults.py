"""Retries and failures: a retried cell gives the untroubled row; a deterministic failure
becomes a `failed` row without stopping the run, and is tried again on the next run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from integration_support import FaultInjector, comparable, result_files, tiny_scenario_dict

from harness import scheduler
from harness.config import parse_scenario
from harness.grid import expand_cells
from results import load
from results.store import ok_cell_ids

# One trigger-set cell: three victims (owner + two null models), embed, a real attack, verify.
FAULT_CELL = {
    "methods": [{"name": "trigger_set", "params": {"n_keys": 20, "n_null": 2}}],
    "attacks": [{"name": "prune", "params": {"sparsity": 0.3}}],
}


@pytest.fixture(scope="module")
def untroubled(ray_session, tmp_path_factory):
    """The fault cell run once without faults, in its own store: the reference row."""
    scenario = parse_scenario(tiny_scenario_dict(**FAULT_CELL))
    (cell,) = expand_cells(scenario)
    store = str(tmp_path_factory.mktemp("untroubled"))
    summary = scheduler.run_cells([cell], store, resources=scenario.resources)
    assert (summary.ok, summary.failed) == (1, 0), summary.failures
    (row,) = load(store).to_dict("records")
    return scenario, cell, row


@pytest.mark.parametrize(
    ("kind", "stage"),
    [("transient", "embed"), ("crash", "attack")],
)
def test_retried_cell_equals_untroubled_one(untroubled, tmp_path, kind, stage):
    """`transient` raises TransientError once (retry_exceptions); `crash` kills the worker
    process once (a system failure, retried under max_retries). Either way the cell ends with
    exactly the row of a run that never failed. (The verify task's failure path is covered by
    test_worker_lost_for_good_is_a_failed_row_then_retried.)"""
    scenario, cell, reference = untroubled
    marker = tmp_path / "fault-fired"
    store = str(tmp_path / "store")
    summary = scheduler.run_cells(
        [cell],
        store,
        resources=scenario.resources,
        max_retries=2,
        executor=FaultInjector(kind, stage, str(marker)),
    )
    assert (summary.ok, summary.failed) == (1, 0), summary.failures
    assert marker.exists(), "the injected fault never fired"
    (row,) = load(store).to_dict("records")
    assert row["status"] == "ok" and pd.isna(row["error"])
    assert row["cell_id"] == reference["cell_id"]
    assert comparable(row) == comparable(reference)


@pytest.fixture
def nan_scenario(tiny_scenario):
    """An attacker fine-tuning every layer at lr 1e6: the loss turns NaN within a few steps."""
    return tiny_scenario(
        methods=["none"],
        attacks=[
            "identity",
            {"name": "fine_tune", "params": {"mode": "ftal", "epochs": 1, "lr": 1e6}},
        ],
    )


def test_deterministic_failure_is_a_failed_row_and_is_retried(ray_session, nan_scenario, tmp_path):
    cells = expand_cells(nan_scenario)
    bad = next(c for c in cells if c.attack == "fine_tune")
    good = next(c for c in cells if c.attack == "identity")
    store = str(tmp_path / "store")

    first = scheduler.run_cells(cells, store, resources=nan_scenario.resources)
    assert (first.total, first.ok, first.failed) == (2, 1, 1)
    assert "non-finite loss" in first.failures[bad.cell_id]
    rows = load(store).set_index("cell_id")
    assert rows.loc[good.cell_id, "status"] == "ok"
    assert rows.loc[bad.cell_id, "status"] == "failed"
    assert "CellFailed" in rows.loc[bad.cell_id, "error"]
    assert "non-finite loss" in rows.loc[bad.cell_id, "error"]
    trace = rows.loc[bad.cell_id, "traceback"]  # where in the worker it failed
    assert trace.startswith("Traceback") and "train_loop" in trace and "CellFailed" in trace
    assert pd.isna(rows.loc[good.cell_id, "traceback"])
    manifest = json.loads(Path(store, "runs", f"{first.run_id}.json").read_text())
    assert manifest["failed"] == 1 and bad.cell_id in manifest["failures"]
    assert ok_cell_ids(store) == {good.cell_id}  # what resume skips

    # The next run skips the ok cell and tries the failed one again (it fails again: same NaN).
    good_mtime = result_files(store)[good.cell_id].stat().st_mtime_ns
    second = scheduler.run_cells(cells, store, resources=nan_scenario.resources)
    assert (second.total, second.skipped, second.ok, second.failed) == (2, 1, 0, 1)
    rows = load(store).set_index("cell_id")
    assert len(rows) == 2 and rows.index.is_unique
    assert rows.loc[bad.cell_id, "run_id"] == second.run_id
    assert rows.loc[good.cell_id, "run_id"] == first.run_id
    assert result_files(store)[good.cell_id].stat().st_mtime_ns == good_mtime


@pytest.mark.parametrize("stage", ["attack", "verify"])
def test_error_outside_a_stage_is_a_failed_row_never_retried(ray_session, tmp_path, stage):
    """Only a TransientError reaches Ray's retries: anything else a task raises is the cell's
    failure, with its message and traceback in the row (a retry would have run clean)."""
    scenario = parse_scenario(tiny_scenario_dict(**FAULT_CELL))
    (cell,) = expand_cells(scenario)
    store = str(tmp_path / "store")
    marker = tmp_path / "fault-fired"
    summary = scheduler.run_cells(
        [cell], store, resources=scenario.resources,
        executor=FaultInjector("error", stage, str(marker)),
    )  # fmt: skip
    assert marker.exists() and (summary.ok, summary.failed) == (0, 1), summary.failures
    (row,) = load(store).to_dict("records")
    assert row["status"] == "failed"
    assert row["error"].startswith(f"{stage}: ValueError: injected deterministic fault")
    assert "Traceback (most recent call last)" in row["traceback"] and "_fault" in row["traceback"]
    again = scheduler.run_cells([cell], store, resources=scenario.resources)
    assert (again.ok, again.failed) == (1, 0)  # the next run retries the failed cell


def test_worker_lost_for_good_is_a_failed_row_then_retried(ray_session, tiny_scenario, tmp_path):
    """With no retries left, a crashed task still ends as a `failed` row (never a gap), the
    run carries on, and the next run completes the cell."""
    scenario = tiny_scenario(
        methods=["none"], attacks=["identity", {"name": "prune", "params": {"sparsity": 0.3}}]
    )
    cells = expand_cells(scenario)
    store = str(tmp_path / "store")
    marker = tmp_path / "fault-fired"
    first = scheduler.run_cells(
        cells,
        store,
        resources=scenario.resources,
        max_retries=0,
        executor=FaultInjector("crash", "verify", str(marker)),
    )
    assert (first.ok, first.failed) == (1, 1), first.failures
    assert marker.exists()
    ((lost, error),) = first.failures.items()
    assert "task failed after retries" in error and "worker died" in error
    rows = load(store).set_index("cell_id")
    assert len(rows) == 2
    assert (
        rows.loc[lost, "status"] == "failed"
        and "task failed after retries" in rows.loc[lost, "error"]
    )
    assert (rows.drop(index=lost)["status"] == "ok").all()

    second = scheduler.run_cells(cells, store, resources=scenario.resources)
    assert (second.skipped, second.ok, second.failed) == (1, 1, 0)
    rows = load(store).set_index("cell_id")
    assert len(rows) == 2 and (rows["status"] == "ok").all()


def test_harness_run_exits_3_when_a_cell_failed_and_0_once_all_are_ok(tmp_path):
    """A script can trust the exit code: failed cells -> 3 with the failures printed."""
    bad = tiny_scenario_dict(
        name="exit_codes",
        methods=["none"],
        attacks=["identity", {"name": "fine_tune", "params": {"mode": "ftal", "lr": 1e6}}],
    )
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(bad))
    store = str(tmp_path / "store")
    argv = [sys.executable, "-m", "harness.cli", "run", str(path), "--store", store,
            "--no-progress"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ""}
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 3, first.stderr[-2000:]
    assert "1 ok, 1 failed" in first.stderr and "non-finite loss" in first.stderr
    assert "1 of 2 cells failed" in first.stderr
    good = {**bad, "attacks": ["identity"]}
    path.write_text(yaml.safe_dump(good))
    second = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-2000:]


def test_a_node_removed_mid_run_loses_and_duplicates_nothing(tmp_path):
    """A two-node `Cluster` (own process); the worker node is removed once the first row is
    stored. Ray retries the tasks that died with it on the head: every cell ends ok, once."""
    ray_tmp = tempfile.mkdtemp(prefix="wmn", dir="/tmp")  # short: Unix socket path limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("node_loss_driver.py")), str(tmp_path)],
            capture_output=True, text=True, timeout=600, env={**env, "RAY_TMPDIR": ray_tmp},
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["removed"], "the worker node was gone before the fault"
    assert facts["removed_after_rows"] < facts["cells"], "removed after the run had finished"
    assert (facts["ok"], facts["failed"]) == (facts["cells"], 0), facts["failures"]
    assert sorted(facts["stored"]) == facts["expected"]  # every cell once: none lost, none twice
