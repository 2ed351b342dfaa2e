"""The scheduler on real Ray holds a stage ref only while a cell to come needs it: after a run
of no-op cells `graph.refs` is empty, yet every distinct stage key ran exactly once."""

from __future__ import annotations

from collections import Counter

from harness import scheduler
from harness.cells import distinct_jobs
from harness.config import Resources
from harness.executors import NOOP
from harness.grid import expand_cells


class Counting:
    """A remote function that counts what it submits, by stage key."""

    def __init__(self, remote, counts: Counter) -> None:
        self.inner, self.counts = remote, counts

    def remote(self, payload: bytes, *upstream):
        _, key, _ = scheduler._unpack(payload)
        self.counts[key] += 1
        return self.inner.remote(payload, *upstream)


def test_refs_released_and_each_key_submitted_once(ray_session, tiny_scenario) -> None:
    # null models are the victims of seeds 1 and 2: shared between cells far apart in the grid
    scenario = tiny_scenario(
        dataset={"name": "synthetic", "image_size": 16, "channels": 1, "samples": 60},
        seeds=[0, 1, 2, 3],
        attacks=["identity", {"name": "prune", "params": {"sparsity": [0.3, 0.6]}}],
    )
    cells = expand_cells(scenario)
    graph = scheduler.StageGraph("unused", Resources(), 0, NOOP, None, {"run_id": "refs"})
    counts: Counter = Counter()
    graph.tasks = {
        name: task if name == "verify" else Counting(task, counts)
        for name, task in graph.tasks.items()
    }
    graph.plan(cells)
    summary = scheduler.RunSummary(run_id="refs", total=len(cells), skipped=0)
    scheduler._drive(graph, cells, 3, summary, None)
    assert summary.ok == len(cells) == 4 * 2 * 3, summary.failures
    assert graph.refs == {} and graph.needed == {} and graph.live == {}
    assert counts == Counter(dict.fromkeys(distinct_jobs(cells), 1))
