"""Two drivers on one store at once compute every stage and every row once between them; a
third run finds nothing to do. The results folder deleted mid-run is reported, not "all ok"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml
from integration_support import result_files, stored_cell_ids, tiny_scenario_dict

from harness.cells import distinct_jobs
from harness.grid import expand_cells, load_scenario

SCENARIO = tiny_scenario_dict(
    name="two-drivers",
    attacks=["identity", {"name": "prune", "params": {"sparsity": [0.3, 0.6]}}],
)


def _start(scenario: Path, store: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "run", str(scenario), "--store", str(store),
             "--no-progress", "--num-cpus", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )


def test_two_drivers_compute_each_stage_and_row_once(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(SCENARIO))
    cells = expand_cells(load_scenario(scenario))
    jobs = Counter(job.stage for job in distinct_jobs(cells).values())
    store = tmp_path / "store"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(scenario, store, log) for log in logs]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)

    assert sorted(stored_cell_ids(store)) == sorted(c.cell_id for c in cells)  # once each
    manifests = [json.loads(p.read_text()) for p in (store / "runs").glob("*.json")]
    assert len(manifests) == 2
    computed = Counter()
    for m in manifests:
        computed.update(m["computed"])
    assert dict(computed) == {**jobs, "verify": len(cells)}, manifests  # nothing twice
    assert sum(m["ok"] for m in manifests) == 2 * len(cells)  # each driver saw every cell ok
    assert sum(m["done_elsewhere"] for m in manifests) == len(cells)  # ...half by the other

    third = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", str(scenario), "--store", str(store),
         "--no-progress"], capture_output=True, text=True, timeout=300,
    )
    assert third.returncode == 0 and f"{len(cells)} already stored, 0 to run" in third.stderr
    assert len(list((store / "runs").glob("*.json"))) == 2  # no run, no manifest


def test_results_deleted_mid_run_are_reported_missing(tmp_path):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump({**SCENARIO, "max_in_flight": 1}))
    store, log = tmp_path / "store", tmp_path / "run.log"
    proc = _start(scenario, store, log)
    deadline = time.monotonic() + 300
    while not result_files(store) and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    shutil.rmtree(store / "results")
    code = proc.wait(timeout=600)
    out = log.read_text()
    assert code == 3, out[-3000:]
    assert "missing from the store" in out, out[-3000:]
    (manifest,) = [json.loads(p.read_text()) for p in (store / "runs").glob("*.json")]
    assert manifest["missing"] >= 1
