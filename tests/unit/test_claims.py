"""Claims: one holder at a time, waiters use the holder's result, dead holders are taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import claims
from harness.claims import claimed


def _path(store: Path, key: str = "k") -> Path:
    return store / "claims" / "embed" / f"{key}.json"


def test_a_second_claimant_waits_then_uses_the_first_ones_result(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "POLL_S", 0.01)
    done = threading.Event()
    order = []

    def second() -> None:
        with claimed(str(tmp_path), "embed", "k", done.is_set) as mine:
            order.append(("second", mine))

    with claimed(str(tmp_path), "embed", "k", done.is_set) as mine:
        assert mine and _path(tmp_path).exists()
        owner = json.loads(_path(tmp_path).read_text())
        assert owner["pid"] == os.getpid()
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        assert thread.is_alive() and not order  # waiting on the live claim
        done.set()  # "the artifact is saved"
    thread.join(5)
    assert order == [("second", False)]
    assert not _path(tmp_path).exists()  # released


def test_a_released_claim_without_a_result_is_claimed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "POLL_S", 0.01)
    with claimed(str(tmp_path), "embed", "k", lambda: False) as first:
        assert first
    with claimed(str(tmp_path), "embed", "k", lambda: False) as again:
        assert again


def test_a_stale_claim_is_taken_over(tmp_path):
    path = _path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"token": "x", "host": "another-host", "pid": 1}))
    old = time.time() - claims.STALE_S - 1
    os.utime(path, (old, old))
    with claimed(str(tmp_path), "embed", "k", lambda: False) as mine:
        assert mine and json.loads(path.read_text())["token"] != "x"


def test_a_live_claim_of_another_host_is_respected(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "POLL_S", 0.01)
    path = _path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"token": "x", "host": "another-host", "pid": 1}))
    calls = []

    def done() -> bool:
        calls.append(1)
        return len(calls) > 20

    with claimed(str(tmp_path), "embed", "k", done) as mine:
        assert not mine  # waited for it (about 20 polls), never took it
    assert json.loads(path.read_text())["token"] == "x"


def test_the_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    path = _path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"token": "x", "host": claims.HOST, "pid": int(dead.stdout)}))
    start = time.monotonic()
    with claimed(str(tmp_path), "embed", "k", lambda: False) as mine:
        assert mine
    assert time.monotonic() - start < 2


def test_the_heartbeat_keeps_a_long_claim_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "HEARTBEAT_S", 0.05)
    with claimed(str(tmp_path), "embed", "k", lambda: False):
        path = _path(tmp_path)
        old = time.time() - 100
        os.utime(path, (old, old))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 1


@pytest.mark.parametrize("holders", [4])
def test_many_claimants_one_holder_at_a_time(tmp_path, monkeypatch, holders):
    monkeypatch.setattr(claims, "POLL_S", 0.005)
    inside, most, done = [0], [0], threading.Event()
    lock = threading.Lock()
    computed = []

    def worker(i: int) -> None:
        with claimed(str(tmp_path), "embed", "k", done.is_set) as mine:
            if not mine:
                return
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            computed.append(i)
            done.set()
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(holders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert most[0] == 1 and len(computed) == 1
