"""The only module that imports Ray: turns cells into a deduplicated stage DAG of Ray tasks.

One task per distinct stage key (a victim shared by 30 cells is trained once); downstream
tasks take upstream ObjectRefs so Ray schedules them when their inputs are ready. The driver
keeps a bounded window of cells in flight with `ray.wait`, shows progress, and writes only
the run manifest; each cell's verify task writes its own Parquet row.
"""

from __future__ import annotations

import platform
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow
import ray
import timm
import torch

from harness import __version__
from harness.cells import Cell, Job, cell_id_of
from harness.config import Resources
from harness.errors import TransientError
from harness.executors import REAL, Executor
from results.store import ok_cell_ids, write_manifest


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
    return "cuda" if torch.cuda.is_available() else "cpu"


def stage_task(executor: Executor, stage: str, cell: dict, key: str, store: str, *upstream):
    return executor.stage(stage)(cell, key, store, _device(), *upstream)


def verify_task(
    executor: Executor, stage: str, cell: dict, cell_id: str, store: str, run: dict, *upstream
) -> dict:
    row = executor.verify(cell, store, _device(), run, *upstream)
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
def record_failure(executor: Executor, cell: dict, store: str, run: dict, error: str) -> None:
    executor.record_failure(cell, store, run, error)


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
        executor: Executor,
        env: dict[str, str] | None,
    ) -> None:
        self.store, self.executor, self.refs = store, executor, {}
        self.exec_ref = executor  # small: pickled into each task (cheaper than an ObjectRef)
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
                self.exec_ref, job.stage, job.cell.to_dict(), job.key, self.store, *deps
            )
            self.refs[job.key] = ref
        return ref

    def submit(self, cell: Cell, run: dict) -> ray.ObjectRef:
        attack = cell.attack_job()
        embed = attack.deps[0]
        refs = [self._submit(job) for job in (embed.deps[0], embed, attack)]
        cell_id = cell_id_of(cell.scenario, attack.key, cell.attack_role, cell.trial)
        return self.tasks["verify"].remote(
            self.exec_ref,
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
    executor: Executor = REAL,
    env: dict[str, str] | None = None,
    manifest: dict | None = None,
    progress: Callable[[RunSummary, int], None] | None = None,
    resume: bool = True,
) -> RunSummary:
    """Run every cell not already stored as ok; returns counts. Needs `connect()` first."""
    done = ok_cell_ids(store) if resume and executor.writes else set()
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
    if executor.writes:
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
        if executor.writes:
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
                ray.get(
                    record_failure.remote(
                        graph.exec_ref, cell.to_dict(), graph.store, run, result["error"]
                    )
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
    return {
        "harness": __version__,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "pyarrow": pyarrow.__version__,
    }
