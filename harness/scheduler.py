"""The only module that imports Ray: turns cells into a deduplicated stage DAG of Ray tasks.

One task per distinct stage key (a victim shared by 30 cells is trained once); downstream
tasks take upstream ObjectRefs so Ray schedules them when their inputs are ready. The driver
keeps a bounded window of cells in flight with `ray.wait`, shows progress, and writes only
the run manifest; each cell's verify task writes its own Parquet row.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import ray

from harness import __version__, stages
from harness.cells import Cell, Job, cell_id_of
from harness.config import Resources
from harness.errors import TransientError
from results.store import ok_cell_ids, write_manifest, write_row

FAULT_ENV = "WMBENCH_INJECT_FAULT"  # "<transient|crash>:<stage>:<marker file>", for fault tests


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Embedded local Ray by default (never a stray running cluster); `address` joins one."""
    if ray.is_initialized():
        return
    if address is None:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            dashboard_host="127.0.0.1",
        )
    else:
        ray.init(address=address, log_to_driver=False)


def _device() -> str:
    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    if not gpus:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _inject_fault(stage: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, where, marker = spec.split(":", 2)
    if where != stage or os.path.exists(marker):
        return
    open(marker, "w").close()
    if kind == "crash":
        os._exit(1)
    raise TransientError(f"injected transient fault in {stage}")


def _noop_stage(cell: dict, key: str, store: str, device: str, *upstream: dict) -> dict:
    return {"key": key}


def _noop_verify(cell: dict, store: str, device: str, run: dict, *upstream: dict) -> dict:
    return {"cell_id": run.get("cell_id"), "status": "ok"}


EXECUTORS: dict[str, tuple[Callable, Callable]] = {
    "real": (stages.get_stage, stages.verify),  # stage name -> function; the verify function
    "noop": (lambda name: _noop_stage, _noop_verify),
}


def stage_task(executor: str, stage: str, cell: dict, key: str, store: str, *upstream) -> dict:
    _inject_fault(stage)
    return EXECUTORS[executor][0](stage)(cell, key, store, _device(), *upstream)


def verify_task(
    executor: str, stage: str, cell: dict, cell_id: str, store: str, run: dict, *upstream: dict
) -> dict:
    _inject_fault("verify")
    row = EXECUTORS[executor][1](cell, store, _device(), run, *upstream)
    if executor == "real":
        write_row(store, row)
    return {"cell_id": cell_id, "status": row["status"], "error": row.get("error")}


# `max_calls` is a decorator-only option: GPU tasks get their own remote functions whose
# worker exits after one task, which frees its GPU memory.
REMOTES = {
    (False, False): ray.remote(stage_task),
    (False, True): ray.remote(max_calls=1)(stage_task),
    (True, False): ray.remote(verify_task),
    (True, True): ray.remote(max_calls=1)(verify_task),
}


@ray.remote(num_cpus=0)
def record_failure(cell: dict, store: str, run: dict, error: str) -> None:
    """A cell whose tasks died for good (retries spent) still gets its failed row."""
    row = stages.base_row(Cell.from_dict(cell), "unknown", run)
    write_row(store, {**row, "status": "failed", "error": error[:2000]})


@dataclass
class RunSummary:
    run_id: str
    total: int
    skipped: int
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    failures: dict[str, str] = field(default_factory=dict)


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class StageGraph:
    """Submits each distinct stage key once and hands out its ObjectRef."""

    def __init__(
        self,
        store: str,
        resources: Resources,
        max_retries: int,
        executor: str,
        env: dict[str, str] | None,
    ) -> None:
        self.store, self.executor, self.refs = store, executor, {}
        runtime_env = {"env_vars": env} if env else None
        self.tasks: dict[str, object] = {}
        for res in ("train", "embed", "attack", "verify"):
            r = resources.for_stage(res)
            opts = {
                "num_cpus": r.num_cpus,
                "num_gpus": r.num_gpus,
                "max_retries": max_retries,
                "retry_exceptions": [TransientError],
            }
            if runtime_env:
                opts["runtime_env"] = runtime_env
            remote = REMOTES[(res == "verify", r.num_gpus > 0)]
            self.tasks[res] = remote.options(**opts)  # built once: `.options` is not free

    def _submit(self, job: Job) -> ray.ObjectRef:
        ref = self.refs.get(job.key)
        if ref is None:
            deps = [self._submit(d) for d in job.deps]
            ref = self.tasks[job.resources].remote(
                self.executor, job.stage, job.cell.to_dict(), job.key, self.store, *deps
            )
            self.refs[job.key] = ref
        return ref

    def submit(self, cell: Cell, run: dict) -> ray.ObjectRef:
        attack = cell.attack_job()
        embed = attack.deps[0]
        refs = [self._submit(job) for job in (embed.deps[0], embed, attack)]
        cell_id = cell_id_of(cell.scenario, attack.key, cell.attack_role, cell.trial)
        return self.tasks["verify"].remote(
            self.executor,
            "verify",
            cell.to_dict(),
            cell_id,
            self.store,
            {**run, "cell_id": cell_id},
            *refs,
        )


def run_cells(
    cells: list[Cell],
    store: str,
    *,
    resources: Resources,
    max_retries: int = 2,
    max_in_flight: int | None = None,
    executor: str = "real",
    env: dict[str, str] | None = None,
    manifest: dict | None = None,
    progress: Callable[[RunSummary, int], None] | None = None,
    resume: bool = True,
) -> RunSummary:
    """Run every cell not already stored as ok; returns counts. Needs `connect()` first."""
    done = ok_cell_ids(store) if resume and executor == "real" else set()
    todo = [c for c in cells if c.cell_id not in done]
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    summary = RunSummary(run_id=run_id, total=len(cells), skipped=len(cells) - len(todo))
    if not todo:
        return summary
    run = {"run_id": run_id, "git_sha": git_sha()}
    record = {
        **(manifest or {}),
        **run,
        "started_at": datetime.now(timezone.utc).isoformat(),
        "versions": _versions(),
        "cells": len(cells),
        "skipped": summary.skipped,
    }
    window = max_in_flight or max(8, 4 * int(ray.cluster_resources().get("CPU", 1)))
    graph = StageGraph(store, resources, max_retries, executor, env)
    if executor == "real":
        write_manifest(store, run_id, record)
    start = time.perf_counter()
    try:
        _drive(graph, iter(todo), run, window, summary, progress)
    except KeyboardInterrupt:
        summary.interrupted = True
        for ref in graph.refs.values():
            ray.cancel(ref, recursive=True)
        raise
    finally:
        summary.seconds = time.perf_counter() - start
        if executor == "real":
            write_manifest(store, run_id, {**record, **_outcome(summary)})
    return summary


def _drive(
    graph: StageGraph,
    pending: Iterable[Cell],
    run: dict,
    window: int,
    summary: RunSummary,
    progress: Callable | None,
) -> None:
    inflight: dict[ray.ObjectRef, Cell] = {}
    pending = iter(pending)
    while True:
        while len(inflight) < window and (cell := next(pending, None)) is not None:
            inflight[graph.submit(cell, run)] = cell
        if not inflight:
            return
        refs = list(inflight)
        ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
        if ready:  # take everything else that is already done in the same pass
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            cell = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:
                result = {"status": "failed", "error": f"task failed after retries: {e}"}
                if graph.executor == "real":
                    ray.get(
                        record_failure.remote(cell.to_dict(), graph.store, run, result["error"])
                    )
            if result["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
                summary.failures[cell.cell_id] = result.get("error") or ""
        if progress:
            progress(summary, len(inflight))


def _outcome(summary: RunSummary) -> dict:
    return {
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "ok": summary.ok,
        "failed": summary.failed,
        "seconds": summary.seconds,
        "interrupted": summary.interrupted,
        "failures": summary.failures,
    }


def _versions() -> dict[str, str]:
    import pyarrow
    import timm
    import torch

    return {
        "harness": __version__,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "pyarrow": pyarrow.__version__,
    }
