"""What a stage task runs: the real stages, a no-op (scheduler benchmarks, cluster tests), or
either with one injected fault (fault tests). Passed to `scheduler.run_cells` as an object
and pickled into each task, so the scheduler has no branch for any of them."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from harness import stages
from harness.errors import TransientError
from results.store import write_row


class Executor:
    """The real stages; `verify` writes the cell's row from the worker."""

    writes = True  # rows, manifests and resume ids live in the store

    def stage(self, name: str) -> Callable:
        return stages.get_stage(name)

    def verify(self, cell: dict, store: str, device: str, run: dict, *upstream: dict) -> dict:
        row = stages.verify(cell, store, device, run, *upstream)
        write_row(store, row)
        return row

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


@dataclass
class FaultInjector(Executor):
    """`inner`, except that the first task of `stage` (`verify` included) fails: `transient`
    raises a TransientError (Ray retries it), `crash` kills the worker process. `marker` is a
    file made on the first fault, so the retry runs clean."""

    kind: str
    stage_name: str
    marker: str
    inner: Executor = Executor()

    @property
    def writes(self) -> bool:  # type: ignore[override]
        return self.inner.writes

    def _fault(self, stage: str) -> None:
        if stage != self.stage_name or os.path.exists(self.marker):
            return
        open(self.marker, "w").close()
        if self.kind == "crash":
            os._exit(1)
        raise TransientError(f"injected transient fault in {stage}")

    def stage(self, name: str) -> Callable:
        fn = self.inner.stage(name)

        def run(*args, **kwargs):
            self._fault(name)
            return fn(*args, **kwargs)

        return run

    def verify(self, cell: dict, store: str, device: str, run: dict, *upstream: dict) -> dict:
        self._fault("verify")
        return self.inner.verify(cell, store, device, run, *upstream)

    def record_failure(self, cell: dict, store: str, run: dict, error: str) -> None:
        self.inner.record_failure(cell, store, run, error)


REAL = Executor()
NOOP = NoopExecutor()
