"""Plain helpers shared by the integration tests (fixtures live in conftest.py)."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray.cloudpickle

from harness.errors import TransientError
from harness.executors import Executor

# Columns that legitimately differ between two runs of the same cell.
RUN_SPECIFIC = {"run_id", "created_at", "duration_s", "stage_seconds", "node", "git_sha"}


def tiny_scenario_dict(**overrides: Any) -> dict[str, Any]:
    """A scenario dict that trains in seconds: LeNet on 16x16 one-channel digits."""
    base: dict[str, Any] = {
        "name": "tiny",
        "dataset": {"name": "digits", "image_size": 16, "channels": 1},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
        "seeds": [0],
        "archs": ["lenet"],
        "methods": ["none", {"name": "trigger_set", "params": {"n_keys": 20, "n_null": 2}}],
        "attacks": ["identity"],
    }
    return {**base, **overrides}


def _parquet_files(store: str | os.PathLike) -> list[Path]:
    """The store's result files (dot-prefixed ones are unfinished atomic writes)."""
    return [p for p in Path(store, "results").rglob("*.parquet") if not p.name.startswith(".")]


def result_files(store: str | os.PathLike) -> dict[str, Path]:
    """cell_id -> its Parquet file."""
    return {p.stem: p for p in _parquet_files(store)}


def stored_cell_ids(store: str | os.PathLike) -> list[str]:
    """Every row's cell_id across all result files, duplicates kept (`results.load` keeps
    only the newest row per cell, which would hide them)."""
    return [
        cid
        for p in _parquet_files(store)
        for cid in pq.read_table(p, columns=["cell_id"])["cell_id"].to_pylist()
    ]


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A row without its run-specific columns, NaN made comparable (NaN != NaN)."""
    return {
        k: ("NaN" if isinstance(v, float) and math.isnan(v) else v)
        for k, v in row.items()
        if k not in RUN_SPECIFIC
    }


def session_processes(sid: int) -> dict[int, str]:
    """Live (non-zombie) processes of session `sid`: pid -> command name.

    A subprocess started with `start_new_session=True` heads its own session; Ray's
    gcs_server, raylet, agents and workers inherit it and keep it after being re-parented
    to init when the driver dies, so this finds them even then.
    """
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(session) == sid and state not in ("Z", "X"):
            found[int(entry)] = name
    return found


def wait_until_gone(sid: int, timeout: float, ignore: tuple[str, ...] = ()) -> dict[int, str]:
    """Poll until no process of session `sid` (other than `ignore`d names) is alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {p: n for p, n in session_processes(sid).items() if not n.startswith(ignore)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def kill_session(sid: int) -> None:
    """SIGKILL what is left of session `sid`, pid by pid (only processes this test started)."""
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _hex_ip(text: str) -> str:
    """An address of /proc/net/tcp{,6} (little-endian 32-bit words) as text."""
    import ipaddress

    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    return str(getattr(ip, "ipv4_mapped", None) or ip)  # ::ffff:127.0.0.1 is 127.0.0.1


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses that processes `pids` listen on (TCP, IPv4 and IPv6), from /proc."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(_hex_ip(fields[1].split(":")[0]))
    return found


@dataclass
class FaultInjector(Executor):
    """`inner`, except that the first task of `stage` (`verify` included) fails: `transient`
    raises a TransientError (Ray retries it), `crash` kills the worker process, `error` raises
    a plain ValueError outside the stage's own failure capture (never retried: the cell
    fails). `marker` is a file made on the first fault, so a retry would run clean."""

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
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-stage, as if OOM-killed
        if self.kind == "error":
            raise ValueError(f"injected deterministic fault in {stage}")
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


# Ray workers cannot import this test module: ship the class (not a reference) with each task.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
