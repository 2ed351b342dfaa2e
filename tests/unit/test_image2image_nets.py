"""Image-to-image networks of output watermarking: shapes at 32 and 64 px, output ranges, errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

from harness.errors import UnknownNameError
from model_zoo.image2image import (
    Extractor,
    PatchDiscriminator,
    ResNetGenerator,
    UNet,
    create_image2image,
    init_normal,
    list_image2image,
    unet_min_size,
)

SIZES = [32, 64]
SIGMOID_NETS = {
    "unet": {"base": 4},
    "cnet": {"base": 8},
    "timm_unet:resnet10t": {"base": 8},
    "timm_unet:mobilenetv3_small_050": {"base": 8},
}
CLAMP_NETS = {"resnet9": {"base": 4}, "resnet16": {"base": 2}}


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


@functools.lru_cache
def surrogate(name: str) -> nn.Module:
    """Built once for both sizes: timm encoders dominate the file's run time."""
    return create_image2image(name, 3, 3, **{**SIGMOID_NETS, **CLAMP_NETS}[name])


def run(net: nn.Module, size: int, in_ch: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return net(torch.rand(2, in_ch, size, size))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(SIGMOID_NETS))
def test_sigmoid_surrogates_keep_size_and_range(name: str, size: int) -> None:
    y = run(surrogate(name), size)
    assert y.shape == (2, 3, size, size)
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(CLAMP_NETS))
def test_resnet_generators_clamp_to_pixel_range(name: str, size: int) -> None:
    y = run(surrogate(name), size)
    assert y.shape == (2, 3, size, size)
    assert y.min() >= 0 and y.max() <= 1


def test_resnet_generator_learns_a_residual() -> None:
    """With the last conv zeroed the residual is 0, so the output is the input itself."""
    net = ResNetGenerator(3, 3, base=4, n_blocks=2)
    nn.init.zeros_(net.net[-1][-1].weight)
    nn.init.zeros_(net.net[-1][-1].bias)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), x)


@pytest.mark.parametrize("size", SIZES)
def test_barrier_unet_takes_image_and_watermark(size: int) -> None:
    y = run(UNet(6, 3, base=4, depth=5), size, in_ch=6)
    assert y.shape == (2, 3, size, size)
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("size", SIZES)
def test_extractor_keeps_size_and_is_non_negative(size: int) -> None:
    net = Extractor(3, 3, base=8)
    y = run(net, size)
    assert y.shape == (2, 3, size, size)
    assert y.min() >= 0
    assert [b.body[0].dilation[0] for b in net.blocks] == [2, 2, 2, 2, 4, 4, 4, 4, 1]


@pytest.mark.parametrize(("size", "patches"), [(32, 1), (64, 3)])
def test_patch_discriminator_outputs_a_patch_map(size: int, patches: int) -> None:
    y = run(PatchDiscriminator(6, base=4), size, in_ch=6)
    assert y.shape == (2, 1, patches, patches)


def test_unet_min_size() -> None:
    assert [unet_min_size(d) for d in (1, 5, 6)] == [2, 32, 64]


def test_unet_too_deep_for_input_names_min_size() -> None:
    with pytest.raises(ValueError, match=r"at least 64x64 \(unet_min_size\(6\)\)"):
        run(UNet(3, 3, base=2, depth=6), 32)


def test_unet_rejects_sizes_its_skips_cannot_align() -> None:
    with pytest.raises(ValueError, match="multiples of 32, got 48x48"):
        run(UNet(3, 3, base=2, depth=5), 48)


def test_unet_rejects_zero_depth() -> None:
    with pytest.raises(ValueError, match="`depth` must be at least 1 but got 0"):
        UNet(3, 3, depth=0)


def test_resnet_generator_needs_equal_channels() -> None:
    with pytest.raises(ValueError, match=r"in_ch \(6\) must equal out_ch \(3\)"):
        ResNetGenerator(6, 3, base=2, n_blocks=1)


def test_unknown_name_lists_the_allowed_ones() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet9'") as err:
        create_image2image("resnet8", 3, 3)
    assert "timm_unet:<timm name>" in str(err.value)
    names = ["cnet", "resnet16", "resnet9", "unet", "timm_unet:<timm name>"]
    assert list_image2image()[:5] == names


def test_width_suffix_sets_the_base_width() -> None:
    assert create_image2image("cnet@8", 3, 3).net[0][0].out_channels == 8
    with pytest.raises(UnknownNameError, match="base width"):
        create_image2image("cnet@0", 3, 3)


def test_unknown_timm_encoder_is_refused() -> None:
    with pytest.raises(UnknownNameError, match="resnet10t"):
        create_image2image("timm_unet:resnet10x", 3, 3)


def test_init_normal_draws_conv_weights_from_n_0_002() -> None:
    conv = init_normal(nn.Conv2d(64, 64, 3))
    weight = conv.weight.detach()
    assert abs(float(weight.std()) - 0.02) < 1e-3
    assert abs(float(weight.mean())) < 1e-3
    assert torch.count_nonzero(conv.bias) == 0
