"""What a stage task runs: the real stages or a no-op (scheduler benchmarks, cluster tests).
Passed to `scheduler.run_cells` as an object and pickled into each task, so the scheduler has
no branch for either. Fault injection lives with the tests (tests/integration), never here."""

from __future__ import annotations

from collections.abc import Callable

from harness import stages
from harness.claims import claimed
from results.store import ok_row_exists, write_row


class Executor:
    """The real stages; `verify` writes the cell's row from the worker."""

    writes = True  # rows, manifests and resume ids live in the store

    def stage(self, name: str) -> Callable:
        return stages.get_stage(name)

    def verify(self, cell: dict, store: str, device: str, run: dict, *upstream: dict) -> dict:
        """The cell's row, computed and written unless another driver on the store holds or
        has written it (then `elsewhere`); `computed`: the stages this run computed for it."""
        c = stages.Cell.from_dict(cell)
        computed = [list(p) for p in sorted(stages.computed_upstream(upstream))]

        def done() -> bool:
            return ok_row_exists(store, c.method, c.attack, c.cell_id)

        with claimed(store, "verify", c.cell_id, done) as mine:
            if not mine:
                return {"status": "ok", "elsewhere": True, "computed": computed}
            row = stages.verify(cell, store, device, run, *upstream)
            write_row(store, row)
        return {**row, "computed": computed}

    def record_failure(self, cell: dict, store: str, run: dict, error: str) -> None:
        """A cell whose tasks died for good (retries spent) still gets its failed row."""
        row = stages.base_row(stages.Cell.from_dict(cell), "unknown", run)
        failed = {"status": "failed", "error": stages.one_line(error), "traceback": error}
        write_row(store, {**row, **failed})


class NoopExecutor(Executor):
    """Every stage returns at once and nothing is written: the scheduler's own overhead."""

    writes = False

    def stage(self, name: str) -> Callable:
        return _noop_stage

    def verify(self, cell: dict, store: str, device: str, run: dict, *upstream: dict) -> dict:
        return {"cell_id": run.get("cell_id"), "status": "ok"}

    def record_failure(self, cell: dict, store: str, run: dict, error: str) -> None:
        return None


def _noop_stage(cell: dict, key: str, store: str, device: str, *upstream: dict) -> dict:
    return {"key": key}


REAL = Executor()
NOOP = NoopExecutor()
