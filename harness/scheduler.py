"""The only module that imports Ray: turns cells into a deduplicated stage DAG of Ray tasks.

One task per distinct stage key (a victim shared by 30 cells is trained once); downstream
tasks take upstream ObjectRefs so Ray schedules them when their inputs are ready. The driver
keeps a bounded window of cells in flight with `ray.wait`, shows progress, and writes only
the run manifest; each cell's verify task writes its own Parquet row.
"""

from __future__ import annotations

import functools
import os
import pickle
import platform
import secrets
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow
import ray
import timm
import torch

import harness
from harness import __version__
from harness.artifacts import owner_secret
from harness.cells import Cell, Job, job_keys
from harness.config import Resources
from harness.errors import ConfigError, TransientError
from harness.executors import REAL, Executor
from harness.stages import one_line
from results.store import ok_cell_ids, write_manifest

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 30.0
TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where `ray.init` looks for its token


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Embedded local Ray by default (never a stray running cluster); `address` joins one.

    The embedded Ray listens on the loopback interface only and its token file is private;
    a cluster that cannot be reached is a ConfigError (exit 2) within `CONNECT_TIMEOUT_S`."""
    if ray.is_initialized():
        return
    if address is None:
        private_token_file()
        with _loopback_only():
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                dashboard_host=LOOPBACK,
                _node_ip_address=LOOPBACK,
            )
        return
    check_reachable(address)
    silent = f"--address {address}: no Ray cluster answered within {CONNECT_TIMEOUT_S:.0f} s"
    with _watchdog(silent):
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(
                f"cannot join the Ray cluster: {one_line(str(e))}", field="--address", value=address
            ) from None


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray has no public switch for a loopback-only node; its own single-machine mode (the
    one it uses on macOS and Windows) takes the node IP as 127.0.0.1, and then every gRPC
    server, the GCS and the agents bind to the loopback interface only. Checked by a test
    that lists the listening sockets of Ray's processes."""
    from ray._private import ray_constants  # lazy: only the embedded Ray needs it

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def private_token_file(path: Path = TOKEN_FILE) -> None:
    """Ray's token file, created here (mode 0600) before `ray.init` would create it readable
    by every user (0644); an existing one that others can read is made private."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return  # the user manages the token
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
            path.chmod(0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A TCP connection to `host:port` (or `ray://host:port`) before Ray's own retries."""
    if address == "auto":
        return  # read from this machine's running Ray; the watchdog bounds the wait
    url = urlsplit(address if "://" in address else f"gcs://{address}")
    default = 10001 if url.scheme == "ray" else 6379
    try:
        host, port = url.hostname, url.port or default
    except ValueError:
        host, port = None, None
    if not host:
        raise ConfigError(
            "not a Ray address", field="--address", value=address,
            allowed="auto, HOST:PORT (the GCS) or ray://HOST:PORT (Ray Client)",
        )
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(
            f"cannot reach {host}:{port}: {e.strerror or e}", field="--address", value=address
        ) from None


@contextmanager
def _watchdog(message: str, seconds: float = CONNECT_TIMEOUT_S) -> Iterator[None]:
    """Ray retries a silent address for minutes inside `ray.init`, which cannot be
    interrupted from another thread: after `seconds`, print `message` and exit 2."""

    def fire() -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(ConfigError.exit_code)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def check_resources(resources: Resources, stages: Iterable[str]) -> list[str]:
    """Every stage's request fits on one node: a ConfigError (exit 2) before any task starts
    when none can ever fit; on an autoscaling cluster, warnings naming the node type that
    would have to start (returned)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    groups = _autoscaler_groups()
    warnings = []
    for stage in dict.fromkeys(stages):
        r = resources.for_stage(stage)
        want = {"CPU": r.num_cpus, "GPU": r.num_gpus}

        def fit(have: dict, want=want) -> bool:
            return all(have.get(k, 0) >= v for k, v in want.items())

        if any(fit(n) for n in nodes):
            continue
        fits = [name for name, have in groups.items() if fit(have)]
        if fits:
            warnings.append(
                f"resources.{stage} (num_cpus {r.num_cpus}, num_gpus {r.num_gpus}): no live "
                f"node fits; the autoscaler must start a {' or '.join(fits)} node"
            )
            continue
        largest = ", ".join(
            f"CPU {n.get('CPU', 0):g} GPU {n.get('GPU', 0):g}" for n in nodes
        ) or "no live node"
        raise ConfigError(
            f"no node of this cluster can ever run this stage (nodes: {largest}"
            + (f"; autoscaler node types: {', '.join(groups)}" if groups else "")
            + ")",
            field=f"resources.{stage}",
            value={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        )
    return warnings


def _autoscaler_groups() -> dict[str, dict[str, float]]:
    """Node types an autoscaler may start (name -> resources); empty without an autoscaler.
    Ray keeps them in the GCS; it has no public reader, so any failure means none."""
    try:
        from ray._private.state import state  # lazy: only for the resource check

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: no autoscaler information
        return {}
    if config is None:
        return {}
    return {
        g.name: dict(g.resources) for g in config.node_group_configs if g.max_count != 0
    }


def _device() -> str:
    gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    if not gpus:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def bind_tasks(executor: Executor, store: str, run: dict) -> dict[tuple[bool, bool], Callable]:
    """The run's remote functions, keyed (verify?, GPU?), with the executor, the store and the
    run's fields bound in: Ray pickles them once per worker, not into every task. Each task
    then takes one small bytes argument, `(stage or cell id, key, pickled cell)`, plus its
    upstream refs: per-argument serialisation is most of Ray's submit cost on tiny tasks.

    Only an exception that escapes the executor reaches Ray, and Ray retries it
    (`retry_exceptions=True`: a per-call allowlist is pickled into every submission); the
    stages return deterministic failures as results, so what escapes is a `TransientError`,
    and anything else is turned into a failure here, never retried."""

    def make(gpu: bool) -> tuple[Callable, Callable]:
        device = _device if gpu else _cpu

        def stage_task(payload: bytes, *upstream):
            stage, key, cell = _unpack(payload)
            try:
                return executor.stage(stage)(cell, key, store, device(), *upstream)
            except TransientError:
                raise
            except Exception as e:  # noqa: BLE001 - never retried, the cell's row says why
                return _failed_meta(stage, e)

        def verify_task(payload: bytes, *upstream) -> dict:
            cell_id, _, cell = _unpack(payload)
            try:
                row = executor.verify(cell, store, device(), {**run, "cell_id": cell_id}, *upstream)
            except TransientError:
                raise
            except Exception as e:  # noqa: BLE001
                row = {"status": "failed", **_failed_meta("verify", e)}
                executor.record_failure(cell, store, run, f"{row['error']}\n{row['traceback']}")
            return {
                "cell_id": cell_id,
                "status": row["status"],
                "error": row.get("error"),
                "elsewhere": row.get("elsewhere", False),  # another driver wrote the row
                "computed": row.get("computed", ()),  # [stage, key] this run computed for it
            }

        return stage_task, verify_task

    # `max_calls` is a decorator-only option: GPU tasks get their own remote functions whose
    # worker exits after one task, which frees its GPU memory.
    (cpu_stage, cpu_verify), (gpu_stage, gpu_verify) = make(False), make(True)
    return {
        (False, False): ray.remote(cpu_stage),
        (False, True): ray.remote(max_calls=1)(gpu_stage),
        (True, False): ray.remote(cpu_verify),
        (True, True): ray.remote(max_calls=1)(gpu_verify),
    }


def _cpu() -> str:
    return "cpu"


def _failed_meta(stage: str, e: Exception) -> dict:
    return {
        "failed": True,
        "error": one_line(f"{stage}: {type(e).__name__}: {e}"),
        "traceback": traceback.format_exc(),
    }


def _dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _pack(head: str, key: str, cell_blob: bytes) -> bytes:
    return _dumps((head, key, cell_blob))


def _unpack(payload: bytes) -> tuple[str, str, dict]:
    head, key, cell_blob = pickle.loads(payload)
    return head, key, pickle.loads(cell_blob)


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
    done_elsewhere: int = 0  # ok cells whose row another driver on the store wrote
    rows_written: int = 0
    computed: set[tuple[str, str]] = field(default_factory=set)  # stages this run computed
    missing: list[str] = field(default_factory=list)  # reported ok, yet no row in the store


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit of the harness's own source tree (from the package's location, never the
    working directory's repository), `-dirty` when its code differs from that commit; the
    installed version (`v0.1.0`) for a copy outside any checkout of this project."""
    root = Path(harness.__file__).resolve().parent.parent
    installed = f"v{__version__}"
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, timeout=5,
        )
        lines = out.stdout.split()
        if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
            return installed  # not a checkout of this project (site-packages in another repo)
        dirty = subprocess.run(
            ["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "harness", "model_zoo",
             "results"], timeout=5,
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return installed
    return lines[1] + ("-dirty" if dirty == 1 else "")


class StageGraph:
    """Submits each distinct stage key once and hands out its ObjectRef.

    A ref is held only while a cell not yet submitted still needs it (`plan` counts them):
    the in-flight downstream tasks keep the object alive for as long as they need it, and Ray
    frees it and the lineage behind it afterwards, so the driver's memory stays flat however
    many cells a run has. A cell submitted without a plan keeps its refs for good."""

    def __init__(
        self,
        store: str,
        resources: Resources,
        max_retries: int,
        executor: Executor,
        env: dict[str, str] | None,
        run: dict,
    ) -> None:
        self.store, self.executor, self.run, self.refs = store, executor, run, {}
        self.needed: dict[str, int] = {}  # key -> planned cells not yet submitted that need it
        # each in-flight cell's verify ref -> the stage refs its submission created
        self.live: dict[ray.ObjectRef, list[ray.ObjectRef]] = {}
        runtime_env = {"env_vars": env} if env else None
        self.tasks: dict[str, object] = {}
        remotes = bind_tasks(executor, store, run)
        for res in ("train", "embed", "attack", "verify"):
            r = resources.for_stage(res)
            opts = {
                "num_cpus": r.num_cpus,
                "num_gpus": r.num_gpus,
                "max_retries": max_retries,
                "retry_exceptions": True,
            }
            if runtime_env:
                opts["runtime_env"] = runtime_env
            remote = remotes[(res == "verify", r.num_gpus > 0)]
            self.tasks[res] = remote.options(**opts)  # built once: `.options` is not free

    def plan(self, cells: Iterable[Cell]) -> None:
        """Count, for every stage key, the cells to be submitted that need it (once each)."""
        needed = self.needed
        upstream: dict[str, set[str]] = {}  # marked model -> its keys and all upstream of it
        for cell in cells:
            embed_key = cell.embed_key()
            keys = upstream.get(embed_key)
            if keys is None:
                keys = upstream[embed_key] = job_keys(cell.embed_job())
            stub = Job("embed", embed_key, cell)  # the attack's own part, then the shared one
            for key in keys | job_keys(cell.attack_job(stub)):
                needed[key] = needed.get(key, 0) + 1

    def _submit(self, job: Job, cell: Cell, blob: bytes, new: list) -> ray.ObjectRef:
        ref = self.refs.get(job.key)
        if ref is None:
            deps = [self._submit(d, cell, blob, new) for d in job.deps]
            job_blob = blob if job.cell is cell else _dumps(job.cell.to_dict())
            ref = self.tasks[job.resources].remote(_pack(job.stage, job.key, job_blob), *deps)
            self.refs[job.key] = ref
            new.append(ref)
        return ref

    def submit(self, cell: Cell) -> ray.ObjectRef:
        blob = _dumps(cell.to_dict())  # pickled once for the cell's own jobs and its verify
        attack = cell.attack_job()
        embed = attack.deps[0]
        new: list[ray.ObjectRef] = []
        refs = [self._submit(job, cell, blob, new) for job in (embed.deps[0], embed, attack)]
        cell_id = cell.cell_id  # remembered by the cell: run_cells asked for it already
        ref = self.tasks["verify"].remote(_pack(cell_id, "verify", blob), *refs)
        self.live[ref] = new
        self._release(job_keys(attack))
        return ref

    def _release(self, keys: Iterable[str]) -> None:
        """One cell fewer needs each of `keys`: drop the refs no cell to come needs."""
        needed = self.needed
        for key in keys:
            count = needed.get(key)
            if count is None:
                continue  # not planned: kept
            if count > 1:
                needed[key] = count - 1
            else:
                del needed[key]
                self.refs.pop(key, None)

    def finished(self, ref: ray.ObjectRef) -> None:
        """A cell's verify task is done (ok or not)."""
        self.live.pop(ref, None)

    def cancel(self) -> None:
        """Cancel every task still held or submitted for a cell in flight."""
        for verify, stages in self.live.items():
            for ref in (verify, *stages):
                ray.cancel(ref, recursive=True)
        for ref in self.refs.values():
            ray.cancel(ref, recursive=True)


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
    if executor.writes:
        owner_secret(store)  # made here, once, before any task could race to make it
    # a deep window keeps Ray's queue full while the driver sleeps between batches; refs are
    # small and a cell's stages are shared, so it costs no memory worth counting
    window = max_in_flight or max(64, 16 * int(ray.cluster_resources().get("CPU", 1)))
    graph = StageGraph(store, resources, max_retries, executor, env, run)
    graph.plan(todo)
    if executor.writes:
        write_manifest(store, run_id, record)
    start = time.perf_counter()
    try:
        _drive(graph, iter(todo), window, summary, progress)
        if executor.writes:  # every row reported ok is in the store (not deleted meanwhile)
            reported_ok = {c.cell_id for c in todo} - summary.failures.keys()
            summary.missing = sorted(reported_ok - ok_cell_ids(store))
    except KeyboardInterrupt:
        summary.interrupted = True
        graph.cancel()
        raise
    finally:
        summary.seconds = time.perf_counter() - start
        if executor.writes:
            write_manifest(store, run_id, {**record, **_outcome(summary)})
    return summary


def _drive(
    graph: StageGraph,
    pending: Iterable[Cell],
    window: int,
    summary: RunSummary,
    progress: Callable | None,
) -> None:
    inflight: dict[ray.ObjectRef, Cell] = {}
    pending = iter(pending)
    while True:
        while len(inflight) < window and (cell := next(pending, None)) is not None:
            inflight[graph.submit(cell)] = cell
        if not inflight:
            return
        refs = list(inflight)
        # everything already done, in one call; only when nothing is, block for the first
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if not ready:  # block for a quarter of the window or 0.1 s: one wake-up per batch,
            # not per cell (waking the driver per tiny cell costs more than the cell)
            ready, _ = ray.wait(refs, num_returns=max(1, len(refs) // 4), timeout=0.1)
        try:
            results = ray.get(ready) if ready else []
        except ray.exceptions.RayError:  # one at a time, to tell which ones raised
            results = []
            for ref in ready:
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.RayError as e:
                    results.append(e)
        for ref, result in zip(ready, results, strict=True):
            cell = inflight.pop(ref)
            graph.finished(ref)
            if isinstance(result, ray.exceptions.RayError):
                result = {"status": "failed", "error": f"task failed after retries: {result}"}
                ray.get(
                    record_failure.remote(
                        graph.executor, cell.to_dict(), graph.store, graph.run, result["error"]
                    )
                )
            summary.computed.update(map(tuple, result.get("computed", ())))
            if result.get("elsewhere"):
                summary.done_elsewhere += 1
            else:
                summary.rows_written += 1
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
        "done_elsewhere": summary.done_elsewhere,
        # distinct stages this run computed (cached and other drivers' ones not counted)
        "computed": {
            **Counter(stage for stage, _ in summary.computed),
            "verify": summary.rows_written,
        },
        "missing": len(summary.missing),
        "missing_cells": summary.missing[:100],
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
