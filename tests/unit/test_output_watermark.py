"""Output watermarking and the surrogate attack: watermarks, bad input, the marked model's
rebuild, the training loops, on tiny data (the full method x attack grid is in tests/contract)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.artifacts import ArtifactStore
from harness.config import parse_scenario
from harness.errors import ConfigError
from harness.grid import check_scenario
from harness.image_training import LOSSES, quantised_outputs, train_image_model
from harness.methods.output_watermark import (
    BUILTIN_WATERMARKS,
    MIN_DARK_AREA,
    builtin_watermark,
    dark_area,
)
from model_zoo import ModelSpec, create_model
from model_zoo.image2image import Barrier

pytestmark = pytest.mark.usefixtures("one_thread")


def scenario(method_params=None, attack=None, size=32, arch="unet@8"):
    return parse_scenario(
        {
            "name": "ow",
            "dataset": {"name": "photo_pairs", "image_size": size, "samples": 60},
            "archs": [arch],
            "methods": [{"name": "output_watermark", "params": method_params or {}}],
            "attacks": [attack or "identity"],
        }
    )


def refused(sc) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        check_scenario(sc, "ow.yaml")
    assert err.value.exit_code == 2
    return err.value


@pytest.mark.parametrize("name", BUILTIN_WATERMARKS)
@pytest.mark.parametrize("size", [32, 64, 256])
def test_builtin_watermarks_are_binary_with_enough_dark_area(name, size):
    delta = builtin_watermark(name, size)
    assert delta.shape == (1, size, size)
    assert set(delta.unique().tolist()) == {0.0, 1.0}
    assert dark_area(delta) >= MIN_DARK_AREA
    # the NC pitfall: a blank (white) extraction stays far below the 0.95 threshold
    from harness.image_metrics import nc

    assert nc(torch.ones(1, 1, size, size), delta[None]).item() < 0.8


def test_user_watermark_path_must_exist_and_fit(tmp_path):
    err = refused(scenario({"watermark_path": str(tmp_path / "missing.png")}))
    assert err.field == "methods[0].params.watermark_path"
    assert "not found" in str(err)
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(wrong)
    err = refused(scenario({"watermark_path": str(wrong)}))
    assert err.field == "methods[0].params.watermark_path" and err.allowed == "32x32"
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(blank)
    err = refused(scenario({"watermark_path": str(blank)}))
    assert "dark area" in str(err)
    good = tmp_path / "good.png"
    Image.fromarray((np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)).save(good)
    check_scenario(scenario({"watermark_path": str(good)}), "ow.yaml")


def test_image_size_below_what_the_unet_depth_needs_is_refused():
    err = refused(scenario({"h_depth": 6}))
    assert err.field == "methods[0].params.h_depth" and 5 in err.allowed
    err = refused(scenario(size=16, arch="cnet@8", method_params={"h_depth": 4, "lambda3": 0}))
    assert err.field == "archs[0]" or err.field.startswith("methods[0]")
    err = refused(scenario(size=16, arch="unet@8", method_params={"h_depth": 4, "lambda3": 0}))
    assert err.field == "archs[0]" and "16x16" in str(err)


def test_unknown_loss_and_arch_of_the_surrogate_are_refused():
    err = refused(scenario(attack={"name": "surrogate", "params": {"loss": "l3"}}))
    assert err.field == "attacks[0].params.loss" and "l2+gan" in err.allowed
    err = refused(scenario(attack={"name": "surrogate", "params": {"arch": "resnet8"}}))
    assert err.field == "attacks[0].params.arch" and err.hint == "resnet9"


def test_marked_model_rebuilds_from_its_spec(tmp_path):
    spec = ModelSpec("cnet@4", 0, 3, 32, wrapper="barrier", wrapper_params={"width": 4, "depth": 5})
    marked = create_model(spec)
    assert isinstance(marked, Barrier)
    marked.delta.copy_(builtin_watermark("coins", 32)[None].expand(1, 3, -1, -1))
    store = ArtifactStore(str(tmp_path))
    meta = store.save("embed", "k", {"spec": spec.to_dict()}, model=marked.eval())
    loaded, loaded_spec = store.load_model(meta)
    x = torch.rand(2, 3, 32, 32)
    assert loaded_spec == spec
    assert torch.equal(loaded(x), marked(x))
    assert torch.equal(loaded.delta, marked.delta)


@pytest.mark.parametrize("loss", LOSSES)
def test_surrogate_training_lowers_its_loss(loss):
    torch.manual_seed(0)
    x = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    targets = (255 - x.float()).to(torch.uint8)  # an easy, learnable mapping
    from model_zoo.image2image import create_image2image

    net = create_image2image("cnet@8", 3, 3)
    kw = dict(loss=loss, lr=1e-2, batch_size=8, device="cpu", seed=0, disc_width=8)
    first = train_image_model(net, x, targets, epochs=1, **kw)["loss"]
    later = train_image_model(net, x, targets, epochs=6, **kw)["loss"]
    assert later < first
    assert quantised_outputs(net, x, "cpu").dtype == torch.uint8
