"""Content-addressed artifact store over pyarrow.fs (a local path, s3:// or gs://).

Layout: <store>/artifacts/<stage>/<key>/{model.pt, key.pt, meta.json}. `meta.json` is written
last, so its presence means the artifact is complete. Checkpoints hold state dicts and plain
tensors only and load with `weights_only=True`. An unchanged model is stored as a reference
to the artifact it came from, not copied.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch
import torch.nn as nn

from harness.fs import atomic_write, exists, open_store, read_bytes
from model_zoo import ModelSpec, create_model


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


class Artifact:
    """A finished stage's output as a plug-in sees it (``ctx.inputs[name]``, ``ctx.marked``):
    its public ``meta``, and the model, weights and secret, each loaded on first use."""

    def __init__(
        self,
        store: ArtifactStore,
        meta: dict[str, Any],
        device: str = "cpu",
        inputs: dict[str, Artifact] | None = None,
    ) -> None:
        self.store, self.meta, self.device = store, meta, device
        self.inputs: dict[str, Artifact] = inputs or {}
        self._secret: dict[str, Any] | None = None

    @property
    def spec(self) -> ModelSpec | None:
        return ModelSpec(**self.meta["spec"]) if self.meta.get("spec") else None

    def model(self, device: str | None = None) -> nn.Module:
        """The stored network, rebuilt from its spec, in eval mode on `device`."""
        if self.spec is None:
            raise ValueError(f"{self.meta.get('stage')} stored no model spec: use state()")
        return self.store.load_model(self.meta, device or self.device)[0]

    def state(self) -> dict[str, Any]:
        """The stored weights (for networks a plug-in rebuilds itself from `meta`)."""
        return self.store.load_state(self.meta)

    def secret(self) -> dict[str, Any]:
        if self._secret is None:
            self._secret = self.store.load_secret(self.meta["stage"], self.meta["key"])
        return self._secret

    def with_inputs(self) -> Artifact:
        """This artifact with the inputs it was made from (the `inputs` its meta records)."""
        refs = self.meta.get("inputs") or {}
        self.inputs = {
            name: Artifact(self.store, self.store.load_meta(stage, key), self.device)
            for name, (stage, key) in refs.items()
        }
        return self
