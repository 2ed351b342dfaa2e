"""Passport layers: the hashed signature, the two branches, the losses and the timm converter."""

from __future__ import annotations

import copy
import hashlib

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from model_zoo.passport import (
    PassportNorm,
    convert_to_passport,
    passport_layers,
    set_mode,
    signature_bits,
)

IMG = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(3, IMG, IMG, generator=gen), torch.rand(3, IMG, IMG, generator=gen)


def _resnet(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=10)


def _layer(channels: int = 8) -> PassportNorm:
    torch.manual_seed(0)
    gamma, beta = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
    return PassportNorm(nn.Conv2d(3, channels, 3), nn.BatchNorm2d(channels), gamma, beta)


def test_signature_is_the_sha512_prefix_as_signs():
    passport = torch.zeros(3, 4, 4)
    first_byte = hashlib.sha512(bytes(48)).digest()[0]
    expected = [1.0 if first_byte >> (7 - i) & 1 else -1.0 for i in range(8)]
    assert signature_bits(passport, 8).tolist() == expected


def test_signature_is_deterministic_and_survives_an_8_bit_round_trip():
    passport, other = _images()
    bits = signature_bits(passport, 512)
    assert bits.shape == (512,) and set(bits.unique().tolist()) == {-1.0, 1.0}
    as_png = torch.round(passport * 255).to(torch.uint8)
    assert torch.equal(signature_bits(as_png, 512), bits)
    assert torch.equal(signature_bits(as_png.float() / 255, 512), bits)
    assert torch.equal(signature_bits(passport[None], 64), bits[:64])
    assert not torch.equal(signature_bits(other, 512), bits)


@pytest.mark.parametrize("n", [0, 513])
def test_signature_length_is_bounded_by_one_digest(n: int):
    with pytest.raises(ValueError, match="between 1 and 512"):
        signature_bits(torch.zeros(3, 4, 4), n)


def test_sign_loss_is_zero_only_when_every_sign_agrees_by_the_margin():
    layer = _layer()
    with torch.no_grad():
        response = layer.passport_response(layer.passport_gamma)
        bits = torch.where(torch.arange(8) % 2 == 0, 1.0, -1.0)
        layer.bn1.weight.copy_(0.2 * bits / response)  # s = 0.2 * bits
    assert layer.sign_loss(bits).item() == pytest.approx(0.0)
    assert layer.signature_detection(bits) == 1.0
    flipped = bits.clone()
    flipped[0] = -flipped[0]
    assert layer.sign_loss(flipped).item() == pytest.approx(0.1 * (0.1 + 0.2))
    assert layer.signature_detection(flipped) == 7 / 8
    with pytest.raises(ValueError, match="signature_bits\\(passport, 8\\)"):
        layer.sign_loss(signature_bits(torch.zeros(3, 4, 4), 16))


def test_verification_branch_applies_the_passport_affine():
    layer = _layer().eval()
    last = layer.tlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1.0)  # gamma_p = beta_p = 1
    x = torch.rand(2, 3, 8, 8)
    deployed = layer(x)
    set_mode(layer, "verification")
    assert torch.allclose(layer(x), deployed + 1, atol=1e-6)
    assert layer.balance_loss().item() == pytest.approx(8.0)  # |beta0 - (beta1 + 1)| = 1 each


def test_set_mode_refuses_unknown_modes_and_plain_models():
    with pytest.raises(ValueError, match="Allowed: deployment, verification"):
        set_mode(_layer(), "owner")
    with pytest.raises(ValueError, match="no passport layer"):
        set_mode(nn.Linear(2, 2), "deployment")


@pytest.mark.parametrize(("arch", "n_bn"), [("resnet18", 5), ("resnet10t", 3)])
def test_converter_swaps_layer4_and_keeps_deployment_exact(arch: str, n_bn: int):
    model = _resnet(arch).eval()
    original = copy.deepcopy(model)
    layers = convert_to_passport(model, ["layer4"], *_images())
    assert len(layers) == n_bn == len(passport_layers(model.layer4))
    remaining = [m for m in model.layer4.modules() if type(m) is nn.BatchNorm2d]
    assert len(remaining) == 2 * n_bn  # only each passport layer's own BN0 and BN1
    x = torch.rand(2, 3, IMG, IMG)
    deployed = model(x)
    assert deployed.shape == (2, 10)
    assert torch.equal(deployed, original(x))
    set_mode(model, "verification")
    verified = model(x)
    assert verified.shape == (2, 10)
    assert not torch.allclose(verified, deployed, atol=1e-4)


def test_converter_defaults_to_the_deepest_stage():
    model = _resnet("resnet10t")
    assert len(convert_to_passport(model, None, *_images())) == 3
    with pytest.raises(ValueError, match="already has passport layers"):
        convert_to_passport(model, ["layer4"], *_images())


def test_converter_names_the_stages_that_exist():
    with pytest.raises(ValueError, match="no stage 'layer5'.*Did you mean 'layer4'.*layer1"):
        convert_to_passport(_resnet("resnet10t"), ["layer5"], *_images())


def test_converter_refuses_a_vit_clearly():
    vit = timm.create_model("test_vit", pretrained=False, img_size=IMG, num_classes=10)
    with pytest.raises(ValueError, match="no BatchNorm2d.*this model has no BatchNorm2d"):
        convert_to_passport(vit, None, *_images())


def _detections(layers: list[PassportNorm], bits: list[torch.Tensor]) -> list[float]:
    return [layer.signature_detection(b) for layer, b in zip(layers, bits, strict=True)]


def test_joint_training_raises_signature_detection_past_the_ownership_threshold():
    model = _resnet("resnet10t")
    passport_gamma, passport_beta = _images()
    layers = convert_to_passport(model, ["layer4"], passport_gamma, passport_beta)
    bits = [signature_bits(passport_gamma, layer.channels) for layer in layers]
    before = _detections(layers, bits)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.rand(8, 3, IMG, IMG), torch.randint(0, 10, (8,))
    for _ in range(12):
        loss = sum(layer.sign_loss(b) for layer, b in zip(layers, bits, strict=True))
        for mode in ("deployment", "verification"):
            set_mode(model, mode)
            loss = loss + F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert max(before) < 0.6  # chance, or 0 where timm zero-initialises the last BN
    assert min(_detections(layers, bits)) >= 0.9
