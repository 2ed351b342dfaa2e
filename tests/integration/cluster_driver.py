"""Driver for test_cluster_placement.py, run in a fresh process (a `Cluster` cannot share the
test session's Ray): a two-node `ray.cluster_utils.Cluster`, each node with 2 CPUs and one
fake GPU, then two experiments whose facts are written to <argv[1]>/facts.json.

1. `rendezvous`: four tasks shaped like the scenario's attack stage (0.5 CPU, 0.5 GPU,
   max_calls=1) that each wait for all four to be running at once. Two GPUs can host that
   only by packing two fractional tasks per GPU on both nodes.
2. `run_cells`: harness.scheduler.run_cells with the no-op executor, attacks on half a GPU
   (train and embed on CPU only, which keeps fresh-worker start-ups few); where each task
   ran, with what resources and in which worker, is read back from Ray's state API (which
   needs the head's dashboard).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import uuid
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_tasks

from harness import scheduler
from harness.config import parse_scenario
from harness.executors import NOOP
from harness.grid import expand_cells

SCENARIO = {
    "name": "placement",
    "dataset": {"name": "synthetic", "image_size": 16, "channels": 1},
    "archs": ["lenet"],
    "methods": ["none"],
    "attacks": [
        "identity",
        {"name": "prune", "params": {"sparsity": [0.2, 0.4]}},
        {"name": "quantize", "params": {"bits": 8}},
    ],
    "resources": {
        "train": {"num_cpus": 0.5, "num_gpus": 0},
        "attack": {"num_cpus": 0.5, "num_gpus": 0.5},
        "verify": {"num_cpus": 0.5, "num_gpus": 0},
    },
}
PARTIES = 4
DEADLINE_S = 120.0  # only a guard against hanging: a task that waits this long reports so


def rendezvous(barrier: str, parties: int) -> dict:
    """Arrive, then wait until `parties` tasks have arrived; report where this one ran."""
    Path(barrier, uuid.uuid4().hex).touch()
    deadline = time.monotonic() + DEADLINE_S
    while (arrived := len(list(Path(barrier).iterdir()))) < parties and time.monotonic() < deadline:
        time.sleep(0.05)
    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "gpu_ids": ctx.get_accelerator_ids().get("GPU", []),
        "all_arrived": arrived >= parties,
    }


def packing(scenario, barrier: Path) -> list[dict]:
    shape = scenario.resources.for_stage("attack")
    task = ray.remote(max_calls=1)(rendezvous).options(
        num_cpus=shape.num_cpus, num_gpus=shape.num_gpus
    )
    barrier.mkdir()
    return ray.get(
        [task.remote(str(barrier), PARTIES) for _ in range(PARTIES)], timeout=DEADLINE_S + 60
    )


def harness_tasks(expected: int) -> list[dict]:
    """The job's finished stage/verify tasks, polled until Ray's task events have all arrived."""
    job = ray.get_runtime_context().get_job_id()
    deadline = time.monotonic() + 60
    while True:
        tasks = [
            t
            for t in list_tasks(
                filters=[("job_id", "=", job), ("state", "=", "FINISHED")],
                detail=True,
                limit=10_000,
                raise_on_missing_output=False,
            )
            if t.name in ("stage_task", "verify_task")
        ]
        if len(tasks) >= expected or time.monotonic() > deadline:
            return [
                {
                    "name": t.name,
                    "node_id": t.node_id,
                    "worker_pid": t.worker_pid,
                    "required_resources": t.required_resources,
                }
                for t in tasks
            ]
        time.sleep(0.5)


def main(work: Path) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
        },
    )
    try:
        cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        scenario = parse_scenario(SCENARIO)
        cells = expand_cells(scenario)
        facts = {
            "nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]],
            "rendezvous": packing(scenario, work / "barrier"),
        }
        victims = {c.victim_key() for c in cells}
        embeds = {c.embed_key() for c in cells}
        facts["expected"] = {
            "victims": len(victims),
            "embeds": len(embeds),
            "attacks": len({c.attack_key() for c in cells}),
            "cells": len(cells),
        }
        try:
            summary = scheduler.run_cells(
                cells,
                str(work / "store"),
                resources=scenario.resources,
                executor=NOOP,
            )
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            facts["run_cells_error"] = traceback.format_exc()
        else:
            facts["summary"] = {
                "total": summary.total,
                "ok": summary.ok,
                "failed": summary.failed,
                "failures": summary.failures,
            }
            facts["tasks"] = harness_tasks(len(victims) + len(embeds) + 2 * len(cells))
        (work / "facts.json").write_text(json.dumps(facts))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
