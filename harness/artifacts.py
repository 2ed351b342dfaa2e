"""Content-addressed artifact store over pyarrow.fs (a local path, s3:// or gs://).

Layout: <store>/artifacts/<stage>/<key>/{model.pt, key.pt, meta.json}. `meta.json` is written
last, so its presence means the artifact is complete; it records the SHA-256 of the files it
points to, checked on every load, so a truncated or altered checkpoint is named, never used.
Checkpoints hold state dicts and plain tensors only and load with `weights_only=True`. An
unchanged model is stored as a reference to the artifact it came from, not copied.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.nn as nn

from harness.errors import CorruptFile
from harness.fs import atomic_write, exists, open_store, read_bytes
from model_zoo import ModelSpec, create_model


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


META, MODEL, SECRET = "meta.json", "model.pt", "key.pt"
COPY = "copy_{}.pt"  # a licensed copy beside the model (`Embedded.copies`)
OWNER_SECRET = "secrets/owner.key"  # under the store root; never in a row or a manifest
_OWNER_SECRETS: dict[str, bytes] = {}  # per store, per process


def owner_secret(uri: str) -> bytes:
    """The store's owner secret: 32 random bytes made once per store (mode 0600 in a 0700
    folder on a local store), read back ever after. Every key, trigger set and passport a
    plug-in makes derives from it (`ArtifactStore.owner_seed`), so the seeds and parameters
    printed in every row cannot regenerate them, while reruns on the same store can."""
    if uri not in _OWNER_SECRETS:
        fs, root = open_store(uri)
        path = f"{root}/{OWNER_SECRET}"
        if not exists(fs, path):
            _create_secret(fs, path)
        _OWNER_SECRETS[uri] = bytes.fromhex(read_bytes(fs, path).decode().strip())
    return _OWNER_SECRETS[uri]


def new_owner_secret() -> str:
    """32 random bytes as hex (tests replace this to make their stores reproducible)."""
    return secrets.token_hex(32)


def _create_secret(fs: pafs.FileSystem, path: str) -> None:
    text = new_owner_secret().encode()
    if not isinstance(fs, pafs.LocalFileSystem):
        atomic_write(fs, path, text)  # object stores: the bucket's own access control
        return
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:  # O_EXCL: of two processes making it at once, one wins and both read its bytes
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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
        copies: dict[str, nn.Module] | None = None,
    ) -> dict[str, Any]:
        """Write the model (or a reference), the licensed copies, the secret key material,
        then the meta, which holds the content hash of each file it points to."""
        meta = {**meta, "stage": stage, "key": key}
        if copies:
            meta["copies_sha256"] = {
                name: self._write(stage, key, COPY.format(name), _to_bytes(_cpu_state(m)))
                for name, m in copies.items()
            }
        if model is not None:
            meta["model_sha256"] = self._write(stage, key, MODEL, _to_bytes(_cpu_state(model)))
            meta["model_ref"] = [stage, key]
        elif model_ref is not None:
            meta["model_ref"] = list(model_ref)
            meta["model_sha256"] = self.load_meta(*model_ref).get("model_sha256")
        if secret is not None:
            data = _to_bytes(secret)
            atomic_write(self.fs, self.path(stage, key, SECRET), data, private=True)
            meta["secret_sha256"] = sha256(data)
        atomic_write(self.fs, self.path(stage, key, META), json.dumps(meta).encode())
        return meta

    def owner_seed(self, stage: str, key: str) -> int:
        """A 62-bit seed for the secrets of one artifact: HMAC-SHA256 of its stage and key
        under the store's owner secret."""
        mac = hmac.new(owner_secret(self.uri), f"{stage}/{key}".encode(), hashlib.sha256)
        return int.from_bytes(mac.digest()[:8], "big") >> 2

    def _write(self, stage: str, key: str, name: str, data: bytes) -> str:
        atomic_write(self.fs, self.path(stage, key, name), data)
        return sha256(data)

    def _read(self, path: str, expected: str | None) -> bytes:
        """A file's bytes, checked against the hash its meta recorded (older metas have none)."""
        try:
            data = read_bytes(self.fs, path)
        except FileNotFoundError:
            raise CorruptFile(f"{path}: missing (its meta.json points to it)") from None
        if expected is not None and sha256(data) != expected:
            raise CorruptFile(
                f"{path}: content hash mismatch ({len(data)} bytes; truncated or altered)"
            )
        return data

    def load_meta(self, stage: str, key: str) -> dict[str, Any]:
        path = self.path(stage, key, META)
        try:
            return json.loads(read_bytes(self.fs, path))
        except ValueError as e:
            raise CorruptFile(f"{path}: unreadable meta ({e})") from None

    def load_state(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The stored weights (a state dict) that a stage's meta points to."""
        path = self.path(*meta["model_ref"], MODEL)
        return _from_bytes(self._read(path, meta.get("model_sha256")))

    def load_model(self, meta: dict[str, Any], device: str = "cpu") -> tuple[nn.Module, ModelSpec]:
        spec = ModelSpec(**meta["spec"])
        model = create_model(spec)
        model.load_state_dict(self.load_state(meta))
        return model.to(device).eval(), spec

    def load_copy(self, meta: dict[str, Any], name: str, device: str = "cpu") -> nn.Module:
        """A licensed copy the artifact holds, rebuilt from the artifact's spec."""
        shas = meta.get("copies_sha256") or {}
        if name not in shas:
            raise KeyError(f"{meta['stage']} {meta['key']} holds no copy {name!r} ({sorted(shas)})")
        path = self.path(meta["stage"], meta["key"], COPY.format(name))
        model = create_model(ModelSpec(**meta["spec"]))
        model.load_state_dict(_from_bytes(self._read(path, shas[name])))
        return model.to(device).eval()

    def load_secret(self, meta: dict[str, Any]) -> dict[str, Any]:
        path = self.path(meta["stage"], meta["key"], SECRET)
        return _from_bytes(self._read(path, meta.get("secret_sha256")))

    def check(self, stage: str, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(meta, None) when the artifact and every file it points to read back intact, else
        (None, what is wrong, with the path)."""
        try:
            meta = self.load_meta(stage, key)
            if meta.get("model_ref"):
                self._read(self.path(*meta["model_ref"], MODEL), meta.get("model_sha256"))
            if meta.get("secret_sha256"):
                self._read(self.path(stage, key, SECRET), meta["secret_sha256"])
            for name, sha in (meta.get("copies_sha256") or {}).items():
                self._read(self.path(stage, key, COPY.format(name)), sha)
        except CorruptFile as e:
            return None, str(e)
        return meta, None

    def remove(self, stage: str, key: str) -> None:
        remove_folder(self.uri, self.path(stage, key))


def check_store_artifacts(uri: str) -> tuple[int, list[tuple[str, str]]]:
    """(artifacts checked, every one whose meta cannot be read or whose files do not match
    the hashes it records, as (its folder, what is wrong)). Each file is hashed once."""
    store = ArtifactStore(uri)
    selector = pafs.FileSelector(f"{store.root}/artifacts", recursive=True, allow_not_found=True)
    metas = [
        i.path for i in store.fs.get_file_info(selector)
        if i.type == pafs.FileType.File and i.base_name == META
    ]
    hashes: dict[str, str | None] = {}

    def digest(path: str) -> str | None:
        if path not in hashes:
            try:
                hashes[path] = sha256(read_bytes(store.fs, path))
            except FileNotFoundError:
                hashes[path] = None
        return hashes[path]

    bad = []
    for path in sorted(metas):
        folder = path.rsplit("/", 1)[0]
        try:
            meta = json.loads(read_bytes(store.fs, path))
        except ValueError as e:
            bad.append((folder, f"unreadable meta.json ({e})"))
            continue
        files = []
        if meta.get("model_ref"):
            files.append((store.path(*meta["model_ref"], MODEL), meta.get("model_sha256")))
        if meta.get("secret_sha256"):
            files.append((f"{folder}/{SECRET}", meta["secret_sha256"]))
        for name, sha in (meta.get("copies_sha256") or {}).items():
            files.append((f"{folder}/{COPY.format(name)}", sha))
        for file, expected in files:
            got = digest(file)
            if got is None:
                bad.append((folder, f"{file} is missing"))
            elif expected is not None and got != expected:
                bad.append((folder, f"{file}: content hash mismatch (truncated or altered)"))
    return len(metas), bad


def remove_folder(uri: str, folder: str) -> None:
    """Delete an artifact folder, its meta first (so it reads as absent at once)."""
    fs, _ = open_store(uri)
    meta = f"{folder}/{META}"
    if exists(fs, meta):
        fs.delete_file(meta)
    fs.delete_dir(folder)


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

    def copy(self, name: str, device: str | None = None) -> nn.Module:
        """A licensed copy the method handed out beside this model (`Embedded.copies`)."""
        return self.store.load_copy(self.meta, name, device or self.device)

    def copy_names(self) -> list[str]:
        return sorted(self.meta.get("copies_sha256") or {})

    def secret(self) -> dict[str, Any]:
        if self._secret is None:
            self._secret = self.store.load_secret(self.meta)
        return self._secret

    def with_inputs(self) -> Artifact:
        """This artifact with the inputs it was made from (the `inputs` its meta records)."""
        refs = self.meta.get("inputs") or {}
        self.inputs = {
            name: Artifact(self.store, self.store.load_meta(stage, key), self.device)
            for name, (stage, key) in refs.items()
        }
        return self
