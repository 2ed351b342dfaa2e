"""Store filesystem helpers over pyarrow.fs (a local path, s3:// or gs://): no torch, so the
results reader stays light. Part of the dependency-free base with `errors` and `registry`."""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs

from harness.errors import TransientError


def open_store(uri: str) -> tuple[pafs.FileSystem, str]:
    """A filesystem and a root path; plain paths are local and made absolute."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


def atomic_write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Readers see the whole file or none: temp file + rename locally, one PUT on object stores."""
    parent, name = path.rsplit("/", 1)
    try:
        fs.create_dir(parent, recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as e:
        raise TransientError(f"writing {path}: {e}") from e


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound
