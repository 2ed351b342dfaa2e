"""Driver for test_faults.py's node-loss test, run in a fresh process (a `Cluster` cannot share
the test session's Ray): a head and one worker node of a `ray.cluster_utils.Cluster`; real
tiny cells run on both; once the first row is stored, the worker node is removed (its tasks
die with it). Writes the summary and what the store holds to <argv[1]>/facts.json."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from integration_support import stored_cell_ids  # this script's folder is on sys.path
from ray.cluster_utils import Cluster

from harness import scheduler
from harness.config import parse_scenario
from harness.grid import expand_cells

SCENARIO = {
    "name": "node-loss",
    "dataset": {"name": "digits", "image_size": 16, "channels": 1},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
    "archs": ["lenet"],
    "seeds": [0, 1],
    "methods": ["none"],
    "attacks": [
        "identity",
        {"name": "prune", "params": {"sparsity": [0.2, 0.4]}},
        {"name": "fine_tune", "params": {"mode": "ftll", "epochs": 1}},
    ],
    "resources": {"train": {"num_cpus": 1}, "attack": {"num_cpus": 1}, "verify": {"num_cpus": 1}},
}


def main(work: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        scenario = parse_scenario(SCENARIO)
        cells = expand_cells(scenario)
        store = work / "store"
        facts: dict = {"cells": len(cells), "removed": False}

        def remove_when_first_row_lands() -> None:
            deadline = time.monotonic() + 300
            while not (store / "results").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            busy = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] == worker.node_id]
            cluster.remove_node(worker)
            facts["removed"] = bool(busy)
            facts["removed_after_rows"] = len(stored_cell_ids(store))

        killer = threading.Thread(target=remove_when_first_row_lands)
        killer.start()
        resources = scenario.resources
        summary = scheduler.run_cells(cells, str(store), resources=resources, max_retries=3)
        killer.join()
        facts.update(
            ok=summary.ok,
            failed=summary.failed,
            failures=summary.failures,
            stored=stored_cell_ids(store),
            expected=sorted(c.cell_id for c in cells),
        )
        (work / "facts.json").write_text(json.dumps(facts))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
