"""Input-preprocessing attacks (`harness.attacks.base.InputAttack`): the weights stay as they
are, every query passes the transform, and the stored model is rebuilt with it."""

from __future__ import annotations

import pytest
import torch

from harness.artifacts import ArtifactStore
from harness.attacks import create_attack
from harness.attacks.base import InputAttack, install_transform
from harness.attacks.jpeg import jpeg
from harness.cells import Cell
from harness.config import DatasetCfg, TrainCfg
from harness.stages import run_cell
from model_zoo import ModelSpec, create_model

DATA = DatasetCfg(name="synthetic", image_size=16, channels=1, samples=400, num_classes=4)
TRAIN = TrainCfg(epochs=2, batch_size=32, lr=0.05)


def _cell(attack: str, params: dict) -> Cell:
    return Cell(
        "input", DATA.model_dump(mode="json"), TRAIN.model_dump(mode="json"), "lenet", "none",
        {}, attack, create_attack(attack, params).params.model_dump(mode="json"), 0,
    )  # fmt: skip


def test_jpeg_keeps_smooth_images_and_loses_fine_detail():
    g = torch.Generator().manual_seed(0)
    smooth = torch.linspace(0, 1, 32).repeat(2, 3, 32, 1)  # horizontal ramps
    noise = torch.rand(2, 3, 32, 32, generator=g)
    assert (jpeg(smooth, 95) - smooth).abs().mean() < 0.01
    assert (jpeg(noise, 95) - noise).abs().mean() < (jpeg(noise, 10) - noise).abs().mean()
    grey = torch.rand(4, 1, 16, 16, generator=g)
    assert jpeg(grey, 50).shape == grey.shape


def test_bad_quality_is_refused():
    with pytest.raises(ValueError, match="quality"):
        create_attack("jpeg", {"quality": 0})


class _Shift(InputAttack):
    """A transform with a trainable part, to check it is stored and rebuilt."""

    name = "shift_for_test"

    def transform(self, x, modules):
        return x + modules.bias

    def transform_modules(self, spec):
        m = torch.nn.Module()
        m.bias = torch.nn.Parameter(torch.zeros(()))
        return m


def test_installed_transforms_run_in_order_and_their_parts_join_the_state_dict():
    model = create_model(ModelSpec("lenet", 4, 1, 16)).eval()
    seen = []

    class Spy(InputAttack):
        def transform(self, x, modules):
            seen.append(float(x.mean()))
            return x * 0

    parts = _Shift().transform_modules(None)
    parts.bias.data.fill_(0.5)
    install_transform(model, _Shift(), parts)
    install_transform(model, Spy(), None)
    x = torch.zeros(2, 1, 16, 16)
    with torch.no_grad():
        out = model(x)
        blank = create_model(ModelSpec("lenet", 4, 1, 16)).eval()
        blank.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.startswith("input_transform")})  # fmt: skip
        assert torch.allclose(out, blank(torch.zeros_like(x)))  # Spy zeroed the shifted input
    assert seen == [0.5]  # the shift ran first
    assert "input_transform0.bias" in model.state_dict()


def test_a_jpeg_cell_leaves_the_weights_and_the_store_rebuilds_the_transform(tmp_path, one_thread):
    store = str(tmp_path)
    cell = _cell("jpeg", {"quality": 10})
    row = run_cell(cell, store)
    assert row["status"] == "ok", row.get("traceback")
    artifacts = ArtifactStore(store)
    marked, _ = artifacts.load_model(artifacts.load_meta("embed", cell.embed_key()))
    attacked, spec = artifacts.load_model(artifacts.load_meta("attack", cell.attack_key()))
    assert spec.wrapper == "input_transform" and spec.wrapper_params["attack"] == "jpeg"
    assert spec.wrapper_params["params"] == {"quality": 10}
    for k, v in marked.state_dict().items():  # the weights are the marked model's
        assert torch.equal(v, attacked.state_dict()[k])
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(attacked.eval()(x), marked.eval()(jpeg(x, 10)), atol=1e-6)
        assert not torch.allclose(attacked(x), marked(x), atol=1e-3)
