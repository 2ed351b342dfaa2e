"""Content-addressed artifact store over pyarrow.fs (a local path, s3:// or gs://).

Layout: <store>/artifacts/<stage>/<key>/{model.pt, key.pt, meta.json}. `meta.json` is written
last, so its presence means the artifact is complete. Checkpoints hold state dicts and plain
tensors only and load with `weights_only=True`. An unchanged model is stored as a reference
to the artifact it came from, not copied.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.nn as nn

from harness.errors import TransientError
from model_zoo import ModelSpec, create_model


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


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class ArtifactStore:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = open_store(uri)

    def path(self, stage: str, key: str, name: str = "") -> str:
        return f"{self.root}/artifacts/{stage}/{key}/{name}".rstrip("/")

    def has(self, stage: str, key: str) -> bool:
        return exists(self.fs, self.path(stage, key, "meta.json"))

    def save(
        self,
        stage: str,
        key: str,
        meta: dict[str, Any],
        model: nn.Module | None = None,
        model_ref: tuple[str, str] | None = None,
        secret: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write the model (or a reference), the secret key material, then the meta."""
        meta = {**meta, "stage": stage, "key": key}
        if model is not None:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            atomic_write(self.fs, self.path(stage, key, "model.pt"), _to_bytes(state))
            meta["model_ref"] = [stage, key]
        elif model_ref is not None:
            meta["model_ref"] = list(model_ref)
        if secret is not None:
            atomic_write(self.fs, self.path(stage, key, "key.pt"), _to_bytes(secret))
        atomic_write(self.fs, self.path(stage, key, "meta.json"), json.dumps(meta).encode())
        return meta

    def load_meta(self, stage: str, key: str) -> dict[str, Any]:
        return json.loads(read_bytes(self.fs, self.path(stage, key, "meta.json")))

    def load_state(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The stored weights (a state dict) that a stage's meta points to."""
        return _from_bytes(read_bytes(self.fs, self.path(*meta["model_ref"], "model.pt")))

    def load_model(self, meta: dict[str, Any], device: str = "cpu") -> tuple[nn.Module, ModelSpec]:
        spec = ModelSpec(**meta["spec"])
        model = create_model(spec)
        model.load_state_dict(self.load_state(meta))
        return model.to(device).eval(), spec

    def load_secret(self, stage: str, key: str) -> dict[str, Any]:
        return _from_bytes(read_bytes(self.fs, self.path(stage, key, "key.pt")))
