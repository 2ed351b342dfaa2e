"""Licensed copies (`Embedded.copies`) travel with the embed artifact: saved beside the model,
hash-checked on load, and named by the store check when altered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.artifacts import Artifact, ArtifactStore, check_store_artifacts
from harness.errors import CorruptFile
from model_zoo import ModelSpec, create_model

SPEC = ModelSpec("lenet", 4, 1, 16)


def _nets(n: int) -> list[torch.nn.Module]:
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(create_model(SPEC).eval())
    return out


def test_copies_round_trip_and_are_checked(tmp_path: Path):
    store = ArtifactStore(str(tmp_path))
    model, *others = _nets(3)
    copies = {"user1": others[0], "user2": others[1]}
    meta = store.save("embed", "k1", {"spec": SPEC.to_dict()}, model=model, copies=copies)
    handle = Artifact(store, meta)
    assert handle.copy_names() == ["user1", "user2"]
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(handle.copy("user2")(x), others[1](x))
        assert not torch.equal(handle.copy("user1")(x), handle.model()(x))
    with pytest.raises(KeyError, match="user3"):
        handle.copy("user3")
    assert check_store_artifacts(str(tmp_path)) == (1, [])
    path = tmp_path / "artifacts" / "embed" / "k1" / "copy_user1.pt"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptFile, match="copy_user1"):
        handle.copy("user1")
    checked, bad = check_store_artifacts(str(tmp_path))
    assert checked == 1 and len(bad) == 1 and "copy_user1.pt" in bad[0][1]
    assert store.check("embed", "k1")[1] is not None
