"""Multi-node placement on a `ray.cluster_utils.Cluster` with fake GPUs (no training).

The cluster lives in a subprocess (cluster_driver.py) because it cannot share the session's
embedded Ray; that process reports facts as JSON and the assertions are made here. RAY_TMPDIR
points the cluster's session files, and its "current cluster" address file, at a private
folder so that no other Ray on the machine sees it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("cluster_driver.py")


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("cluster")
    # Short: Ray's Unix socket paths under it must stay below 107 characters.
    ray_tmp = tempfile.mkdtemp(prefix="wmr", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        proc = subprocess.run(
            [sys.executable, str(DRIVER), str(work)],
            capture_output=True,
            text=True,
            timeout=420,
            env={**env, "RAY_TMPDIR": ray_tmp},
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((work / "facts.json").read_text())


def test_two_nodes_with_one_fake_gpu_each(facts):
    assert len(set(facts["nodes"])) == 2


def test_fractional_gpu_tasks_pack_two_per_gpu_on_both_nodes(facts):
    """Four 0.5-GPU tasks were all running at the same time on two 1-GPU nodes."""
    placed = facts["rendezvous"]
    assert all(t["all_arrived"] for t in placed), placed
    assert Counter(t["node_id"] for t in placed) == {n: 2 for n in facts["nodes"]}
    for node in facts["nodes"]:
        gpus = [t["gpu_ids"] for t in placed if t["node_id"] == node]
        assert gpus[0] == gpus[1] and len(gpus[0]) == 1  # two tasks, one shared device


@pytest.fixture(scope="module")
def ran(facts) -> dict:
    """The run_cells experiment's facts; fails (with the driver's traceback) if it raised."""
    assert "run_cells_error" not in facts, facts["run_cells_error"]
    return facts


def test_run_cells_noop_all_ok(ran):
    summary = ran["summary"]
    assert summary["failed"] == 0, summary["failures"]
    assert summary["ok"] == summary["total"] == ran["expected"]["cells"] == 4


def _gpu_stage_tasks(ran: dict) -> list[dict]:
    return [
        t for t in ran["tasks"] if t["name"] == "stage_task" and "GPU" in t["required_resources"]
    ]


def test_stage_tasks_deduplicated_and_sized_from_scenario(ran):
    expected = ran["expected"]
    stage = [t for t in ran["tasks"] if t["name"] == "stage_task"]
    verify = [t for t in ran["tasks"] if t["name"] == "verify_task"]
    gpu = _gpu_stage_tasks(ran)
    assert len(stage) == expected["victims"] + expected["embeds"] + expected["attacks"]
    assert len(gpu) == expected["attacks"] == 4
    assert len(verify) == expected["cells"]
    for t in gpu:  # the attack stage: resources.attack
        assert t["required_resources"] == {"CPU": 0.5, "GPU": 0.5}, t
    for t in [t for t in stage if t not in gpu] + verify:  # train, embed (train's), verify
        assert t["required_resources"] == {"CPU": 0.5}, t


def test_gpu_tasks_placed_on_both_nodes(ran):
    assert {t["node_id"] for t in _gpu_stage_tasks(ran)} == set(ran["nodes"])


def test_gpu_tasks_each_get_a_fresh_worker(ran):
    """`max_calls=1` on GPU tasks: a worker exits after one task, freeing GPU memory."""
    workers = [(t["node_id"], t["worker_pid"]) for t in _gpu_stage_tasks(ran)]
    assert len(set(workers)) == len(workers), workers
