"""Store filesystem helpers over pyarrow.fs (a local path, s3:// or gs://): no torch, so the
results reader stays light. Part of the dependency-free base with `errors` and `registry`."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import pyarrow.fs as pafs

from harness.errors import ConfigError, TransientError

T = TypeVar("T")
BACKOFF_S = (0.2, 0.5, 1.0, 2.0)  # object stores: the wait before each retry of a failed call


def retrying(fs: pafs.FileSystem, call: Callable[[], T], what: str) -> T:
    """`call` on an object store, retried with backoff on errors (503 SlowDown, a dropped
    connection), then a TransientError for Ray to retry the task; local calls run once."""
    if isinstance(fs, pafs.LocalFileSystem):
        return call()
    for wait in (*BACKOFF_S, None):
        try:
            return call()
        except FileNotFoundError:
            raise
        except OSError as e:
            if wait is None:
                raise TransientError(f"{what}: {e}") from e
            time.sleep(wait)
    raise AssertionError("unreachable")


def open_store(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and a root path; plain paths are local and made absolute."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


def atomic_write(fs: pafs.FileSystem, path: str, data: bytes, private: bool = False) -> None:
    """Readers see the whole file or none: locally a temp file, fsynced, renamed over the
    target, then the folder fsynced (the rename survives a power cut); one PUT on object
    stores (atomic there). `private`: mode 0600 (keys, the owner secret)."""
    parent, name = path.rsplit("/", 1)
    try:
        fs.create_dir(parent, recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            folder = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        else:
            retrying(fs, lambda: _put(fs, path, data), f"writing {path}")
    except OSError as e:
        raise TransientError(f"writing {path}: {e}") from e


def check_writable(uri: str) -> None:
    """The store can be written: a ConfigError (exit 2) for a path that is a file, a folder
    that cannot be made or written (permissions, a read-only mount) or an object store that
    refuses a write - before any cluster time is spent. Leaves the (empty) store folder."""
    try:
        fs, root = open_store(uri)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            raise ConfigError("the store is a file, not a folder", field="--store", value=uri)
        probe = f"{root}/.write-probe-{uuid.uuid4().hex}"
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"")
        fs.delete_file(probe)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot write to the store: {getattr(e, 'strerror', None) or e}",
            field="--store",
            value=uri,
        ) from None


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retrying(fs, read, f"reading {path}")


def exists(fs: pafs.FileSystem, path: str) -> bool:
    info = retrying(fs, lambda: fs.get_file_info(path), f"looking up {path}")
    return info.type != pafs.FileType.NotFound
