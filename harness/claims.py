"""Claims: two drivers on one store never compute the same stage twice.

Before computing a stage (or a cell's row), a task claims it with a small file in the store,
`<store>/claims/<stage>/<key>.json`, and keeps the claim alive with a heartbeat (the file is
touched every `HEARTBEAT_S`). A task that finds a live claim of another process waits until
the result appears, then uses it; a claim whose heartbeat stopped (`STALE_S`), or whose
process is gone from this host, belongs to a dead driver or worker and is taken over.

Claims are advisory: every write stays atomic and content-addressed, so the worst a race
can cost is one stage computed twice, never a lost or corrupt row. On object stores, which
have no create-if-absent, a claim is written and read back; the last writer wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

from harness.fs import open_store, read_bytes

HEARTBEAT_S = 5.0
STALE_S = 30.0  # a claim not refreshed for this long belongs to a dead process
POLL_S = 0.25
HOST = socket.gethostname()


class Claim:
    """A held claim; its heartbeat thread runs until `release`."""

    def __init__(self, fs: pafs.FileSystem, path: str, token: str) -> None:
        self.fs, self.path, self.token = fs, path, token
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                _touch(self.fs, self.path, self.token)
            except OSError:
                pass  # a store hiccup: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        try:
            if _owner(self.fs, self.path).get("token") == self.token:
                self.fs.delete_file(self.path)
        except (OSError, ValueError):
            pass  # gone already (taken over after a long pause)


@contextmanager
def claimed(store: str, stage: str, key: str, done: Callable[[], bool]) -> Iterator[bool]:
    """Yields True while this process holds the claim on (stage, key) and should compute it;
    False when `done()` became true meanwhile (another driver finished it: use its result)."""
    fs, root = open_store(store)
    path = f"{root}/claims/{stage}/{key}.json"
    claim = acquire(fs, path, done)
    try:
        yield claim is not None
    finally:
        if claim is not None:
            claim.release()


def acquire(fs: pafs.FileSystem, path: str, done: Callable[[], bool]) -> Claim | None:
    token = uuid.uuid4().hex
    while True:
        if done():
            return None
        if _create(fs, path, token):
            if done():  # finished between our check and our claim
                Claim(fs, path, token).release()
                return None
            return Claim(fs, path, token)
        try:
            owner, age = _owner(fs, path), _age(fs, path)
        except (FileNotFoundError, ValueError):
            continue  # released (or half-written) just now: try again
        if _dead(owner, age):
            _remove(fs, path)
            continue
        time.sleep(POLL_S)


def _body(token: str) -> bytes:
    return json.dumps({"token": token, "host": HOST, "pid": os.getpid()}).encode()


def _create(fs: pafs.FileSystem, path: str, token: str) -> bool:
    """Create the claim if absent; True if it is ours."""
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(_body(token))
        return True
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    _touch(fs, path, token)
    time.sleep(POLL_S)  # let a concurrent writer land, then see who won
    try:
        return _owner(fs, path).get("token") == token
    except (FileNotFoundError, ValueError):
        return False


def _touch(fs: pafs.FileSystem, path: str, token: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        os.utime(path)
        return
    with fs.open_output_stream(path) as f:
        f.write(_body(token))


def _owner(fs: pafs.FileSystem, path: str) -> dict:
    return json.loads(read_bytes(fs, path) or b"{}")


def _age(fs: pafs.FileSystem, path: str) -> float:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return time.time() - (info.mtime_ns or 0) / 1e9


def _dead(owner: dict, age: float) -> bool:
    """No heartbeat for STALE_S, or its process no longer exists on this host."""
    if age > STALE_S:
        return True
    if owner.get("host") == HOST and isinstance(owner.get("pid"), int):
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _remove(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass
