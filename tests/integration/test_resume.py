"""A `harness run` killed midway resumes: no duplicate ids, finished cells are not redone.

The CLI runs as a subprocess heading its own session (like a terminal job), so Ctrl-C is
`killpg(SIGINT)` — every process of the group gets it, as a terminal would deliver it. The
subprocess starts its own embedded Ray (`address="local"`); it is handed this session's
address in RAY_ADDRESS and must still not attach to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from integration_support import (
    kill_session,
    result_files,
    session_processes,
    stored_cell_ids,
    tiny_scenario_dict,
    wait_until_gone,
)

from harness import scheduler
from harness.grid import expand_cells, load_scenario
from results import load

# 2 methods x 4 attacks = 8 cells, two in flight at a time so that a kill lands midway.
RESUME = tiny_scenario_dict(
    name="resume",
    attacks=[
        "identity",
        {"name": "prune", "params": {"sparsity": [0.3, 0.6]}},
        {"name": "quantize", "params": {"bits": 8}},
    ],
    max_in_flight=2,
)
RAY_AGENTS = ("ray::DashboardA", "ray::RuntimeEnv")  # /proc comm names (15 characters)


def _restore_sigint() -> None:
    # A background pytest (non-interactive shell) may ignore SIGINT; children would inherit it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _harness_run_argv(scenario: Path, store: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "harness.cli",
        "run",
        str(scenario),
        "--store",
        str(store),
        "--no-progress",
    ]


def _harness_run(scenario: Path, store: Path, log: Path, ray_address: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_address}  # a stray cluster it must ignore
    with open(log, "ab") as out:
        return subprocess.Popen(
            _harness_run_argv(scenario, store),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_restore_sigint,
        )


def _wait_for_results(proc: subprocess.Popen, store: Path, n: int, log: Path) -> None:
    deadline = time.monotonic() + 240
    while len(result_files(store)) < n:
        assert proc.poll() is None, (
            f"harness run exited early ({proc.returncode}):\n{log.read_text()}"
        )
        assert time.monotonic() < deadline, f"no results after 240 s:\n{log.read_text()}"
        time.sleep(0.1)


@pytest.fixture
def scenario_file(tmp_path) -> Path:
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(RESUME))
    return path


@dataclass
class Killed:
    """What a killed run left behind."""

    returncode: int
    store: Path
    cells: list
    files: dict[str, tuple[Path, int]]  # cell_id -> (result file, mtime_ns)
    runs: set[Path]  # run manifests


def _run_and_kill(scenario_file, tmp_path, ray_address, kill, linger=()) -> Killed:
    """Start `harness run`, `kill` it once two cells are stored, wait for its Ray to go.

    Every process of the killed run must exit by itself, except those named in `linger`."""
    store, log = tmp_path / "store", tmp_path / "harness.log"
    cells = expand_cells(load_scenario(scenario_file))
    proc = _harness_run(scenario_file, store, log, ray_address)
    try:
        _wait_for_results(proc, store, 2, log)
        own = set(session_processes(proc.pid).values())
        # Its own embedded Ray: a driver that joined an existing cluster starts neither.
        assert {"gcs_server", "raylet"} <= own, own
        kill(proc)
        returncode = proc.wait(timeout=120)
        leftovers = wait_until_gone(proc.pid, timeout=60, ignore=linger)
    finally:
        kill_session(proc.pid)  # whatever Ray left behind (see test_sigkill_then_resume)
        proc.wait(timeout=30)
    assert not leftovers, f"Ray processes outlived the killed run: {leftovers}"
    files = {cid: (p, p.stat().st_mtime_ns) for cid, p in result_files(store).items()}
    assert 2 <= len(files) < len(cells), "the kill should land midway through the run"
    return Killed(returncode, store, cells, files, set(Path(store, "runs").iterdir()))


def _assert_resumed(killed: Killed) -> None:
    """One ok row per cell, no duplicates, the killed run's rows untouched."""
    store, cells, before = killed.store, killed.cells, killed.files
    df = load(str(store))
    assert len(df) == len(cells) and df["cell_id"].is_unique
    assert set(df["cell_id"]) == {c.cell_id for c in cells}
    assert (df["status"] == "ok").all(), df[["attack", "status", "error"]]
    assert sorted(stored_cell_ids(store)) == sorted(c.cell_id for c in cells)  # no duplicates
    after = result_files(store)
    for cid, (path, mtime) in before.items():
        assert after[cid] == path and path.stat().st_mtime_ns == mtime, f"{cid} was rewritten"
    (resumed_run,) = set(Path(store, "runs").iterdir()) - killed.runs
    resumed = json.loads(resumed_run.read_text())
    assert resumed["skipped"] == len(before) and resumed["ok"] == len(cells) - len(before)
    assert resumed["run_id"] not in set(df.set_index("cell_id").loc[list(before), "run_id"])


def _ctrl_c(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as a terminal does


def _sigterm(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # the driver only, as `kill` or a batch scheduler does


@pytest.mark.parametrize(
    ("stop", "code"), [(_ctrl_c, 130), (_sigterm, 143)], ids=["ctrl-c", "sigterm"]
)
def test_stopped_then_resume(scenario_file, tmp_path, ray_session, stop, code):
    """Ctrl-C, or SIGTERM handled alike, cancels the running tasks, exits 130 (143 for
    SIGTERM), records the run as interrupted; running the same command again finishes the
    grid."""
    killed = _run_and_kill(scenario_file, tmp_path, ray_session, stop)
    log = (tmp_path / "harness.log").read_text()
    assert killed.returncode == code, log
    assert "interrupted" in log
    (stopped,) = killed.runs
    manifest = json.loads(stopped.read_text())
    assert manifest["interrupted"] is True and "finished_at" in manifest

    env = {**os.environ, "RAY_ADDRESS": ray_session}
    done = subprocess.run(
        _harness_run_argv(scenario_file, killed.store),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_resumed(killed)


def test_sigkill_then_resume(scenario_file, tmp_path, ray_session):
    """SIGKILL gives the driver no chance to clean up. Ray 2.60's gcs_server, raylet and
    workers die with it; its dashboard and runtime-env agents linger about a minute before
    exiting on their own, so the helper kills those (only this run's processes, by pid).
    The resume goes through run_cells on the session's Ray (the CLI path is covered above)."""
    killed = _run_and_kill(
        scenario_file, tmp_path, ray_session, lambda p: p.kill(), linger=RAY_AGENTS
    )
    assert killed.returncode == -signal.SIGKILL
    scenario = load_scenario(scenario_file)
    summary = scheduler.run_cells(killed.cells, str(killed.store), resources=scenario.resources)
    assert summary.skipped == len(killed.files) and summary.failed == 0
    _assert_resumed(killed)
