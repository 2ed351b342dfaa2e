"""Passport layers of Steganographic Passport: one model, a deployment and a verification branch.

Both branches share every conv weight W. The verification branch modulates its normalisation with
an owner passport pushed through W and an obfuscating perceptron (TLP), and W is trained so the
passport's response carries a signature hashed from the passport. Forging ownership then means
finding a passport that both keeps accuracy and reproduces a SHA-512 signature.
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from harness.errors import ConfigError
from harness.registry import close_match

SHA512_BITS = 512


class Mode(str, Enum):
    DEPLOYMENT = "deployment"
    VERIFICATION = "verification"


def passport_bytes(passport: Tensor) -> bytes:
    """The bytes that are hashed: the passport as an 8-bit (C, H, W) image, C-contiguous.

    A passport is handed out as an image file, so the signature must survive a PNG round trip;
    float bytes would change with any rounding. Float input is read as [0, 1] pixels
    (clamped, x255, rounded half to even); uint8 input is taken as is; a batch of one is unwrapped.
    """
    img = passport.detach().cpu()
    img = img[0] if img.dim() == 4 and img.shape[0] == 1 else img
    if img.dim() != 3:
        raise ValueError(f"a passport is one (C, H, W) image; got shape {tuple(passport.shape)}")
    if img.dtype != torch.uint8:
        img = torch.round(img.float().clamp(0, 1) * 255).to(torch.uint8)
    return img.contiguous().numpy().tobytes()


def signature_bits(passport: Tensor, n: int) -> Tensor:
    """The first `n` bits of SHA-512(passport_bytes), most significant bit first, as +-1 floats."""
    if not 1 <= n <= SHA512_BITS:
        raise ValueError(
            f"`n` must be between 1 and {SHA512_BITS} (the bits of one SHA-512 digest) but got "
            f"{n}. Put passport layers on a stage with at most {SHA512_BITS} channels."
        )
    digest = np.frombuffer(hashlib.sha512(passport_bytes(passport)).digest(), dtype=np.uint8)
    bits = np.unpackbits(digest)[:n].astype(np.float32)
    return torch.from_numpy(bits * 2 - 1)


class TLP(nn.Sequential):
    """C -> C/4 -> C perceptron shared by gamma_p and beta_p of one layer.

    It hides the plain passport response from the affine factors (activation-level obfuscation),
    so copying W and a forged passport is not enough to rebuild the verification branch.
    """

    def __init__(self, channels: int) -> None:
        hidden = max(1, channels // 4)
        super().__init__(
            nn.Linear(channels, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, channels)
        )


class PassportNorm(nn.Module):
    """Takes the place of a conv and the BatchNorm2d it feeds; the conv's weights stay shared.

    Deployment: BN0(Wx) with its own affine (the original BN, untouched). Verification:
    gamma_p * BN1(Wx) + beta_p, BN1 a copy of the original BN with its own statistics and affine,
    gamma_p = TLP(GAP(W * P_gamma)), beta_p = TLP(GAP(W * P_beta)). The passports are the input
    this conv would see for the passport images (see `convert_to_passport`), kept as buffers.
    """

    def __init__(
        self, conv: nn.Conv2d, bn: nn.BatchNorm2d, passport_gamma: Tensor, passport_beta: Tensor
    ) -> None:
        super().__init__()
        _check_conv_bn(conv, bn)
        self.conv, self.bn0, self.bn1 = conv, bn, copy.deepcopy(bn)
        self.tlp = TLP(bn.num_features)
        self.register_buffer("passport_gamma", _conv_input(passport_gamma, conv))
        self.register_buffer("passport_beta", _conv_input(passport_beta, conv))
        self.mode = Mode.DEPLOYMENT

    @property
    def channels(self) -> int:
        return self.bn0.num_features

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)
        if self.mode == Mode.DEPLOYMENT:
            return self.bn0(z)
        gamma_p, beta_p = self.passport_affine()
        return gamma_p.view(1, -1, 1, 1) * self.bn1(z) + beta_p.view(1, -1, 1, 1)

    def passport_response(self, passport: Tensor) -> Tensor:
        """GAP(W * P): one value per output channel; gradients reach W."""
        return self.conv(passport).mean((0, 2, 3))

    def passport_affine(self) -> tuple[Tensor, Tensor]:
        return (
            self.tlp(self.passport_response(self.passport_gamma)),
            self.tlp(self.passport_response(self.passport_beta)),
        )

    def signature_scores(self) -> Tensor:
        """s = GAP(W * P_gamma) * gamma1, measured before the TLP: the signature lives in W and
        BN1's scale, and the TLP stays free to obfuscate."""
        return self.passport_response(self.passport_gamma) * self.bn1.weight

    def sign_loss(self, bits: Tensor, margin: float = 0.1, weight: float = 0.1) -> Tensor:
        """weight * sum_c max(0, margin - b_c * s_c): zero once every sign agrees by `margin`."""
        return weight * F.relu(margin - self._bits(bits) * self.signature_scores()).sum()

    def balance_loss(self) -> Tensor:
        """L1 gap between the two branches' affines; off in the public code, a switch here."""
        gamma_p, beta_p = self.passport_affine()
        gamma_gap = self.bn0.weight - self.bn1.weight * gamma_p
        beta_gap = self.bn0.bias - (self.bn1.bias * gamma_p + beta_p)
        return gamma_gap.abs().sum() + beta_gap.abs().sum()

    def signature_detection(self, bits: Tensor) -> float:
        """Share of channels whose sign of s matches its bit; s == 0 counts as a mismatch."""
        with torch.no_grad():
            return (self._bits(bits) * self.signature_scores() > 0).float().mean().item()

    def _bits(self, bits: Tensor) -> Tensor:
        if bits.shape != (self.channels,):
            raise ValueError(
                f"bits must hold one +-1 per channel, shape ({self.channels},); got "
                f"{tuple(bits.shape)}. Use signature_bits(passport, {self.channels})."
            )
        return bits.to(self.bn1.weight)


def _check_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    if conv.out_channels != bn.num_features or not bn.affine:
        raise ValueError(
            f"a passport layer needs a conv feeding an affine BatchNorm2d of the same width; got "
            f"{conv.out_channels} conv channels, {bn.num_features} BN features, affine={bn.affine}"
        )


def _conv_input(passport: Tensor, conv: nn.Conv2d) -> Tensor:
    batch = passport.detach().clone()
    batch = batch.unsqueeze(0) if batch.dim() == 3 else batch
    if batch.dim() != 4 or batch.shape[:2] != (1, conv.in_channels):
        raise ValueError(
            f"a passport for this conv is one ({conv.in_channels}, H, W) input; got shape "
            f"{tuple(passport.shape)}"
        )
    return batch.to(conv.weight)


def set_mode(model: nn.Module, mode: Mode | str) -> None:
    """Switch every passport layer of `model` to one branch; both branches must never mix."""
    try:
        mode = Mode(mode)
    except ValueError:
        raise ConfigError(
            "unknown passport mode", field="mode", value=mode, allowed=[m.value for m in Mode]
        ) from None
    layers = passport_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no passport layer; convert_to_passport first")
    for layer in layers:
        layer.mode = mode


def passport_layers(model: nn.Module) -> list[PassportNorm]:
    """Every passport layer in `model`, in module order (the order of its signature losses)."""
    return [m for m in model.modules() if isinstance(m, PassportNorm)]


@dataclass(frozen=True)
class _Slot:
    """Where a BN and the conv feeding it sit in their parent module."""

    parent: nn.Module
    conv_name: str
    bn_name: str

    @property
    def conv(self) -> nn.Conv2d:
        return getattr(self.parent, self.conv_name)

    @property
    def bn(self) -> nn.BatchNorm2d:
        return getattr(self.parent, self.bn_name)


def convert_to_passport(
    model: nn.Module,
    stages: list[str] | None,
    passport_gamma: Tensor,
    passport_beta: Tensor,
) -> list[PassportNorm]:
    """Swap every BatchNorm2d (and the conv feeding it) in `stages` for a PassportNorm, in place.

    `stages` are module paths such as resnet18's "layer4"; None takes the deepest stage of timm's
    `feature_info` (layer4 for ResNets, the paper's choice). The passport images (C, H, W) in
    [0, 1] become per-layer passports: the input each chosen conv sees when the unconverted model
    (eval mode) runs on them. The deployment branch computes exactly what the model did before.
    """
    slots = [slot for name in stages or [_deepest_stage(model)] for slot in _slots(model, name)]
    slots = list({(id(s.parent), s.bn_name): s for s in slots}.values())
    convs = [slot.conv for slot in slots]
    gammas = _capture_conv_inputs(model, convs, passport_gamma)
    betas = _capture_conv_inputs(model, convs, passport_beta)
    layers = []
    for slot, gamma, beta in zip(slots, gammas, betas, strict=True):
        layers.append(PassportNorm(slot.conv, slot.bn, gamma, beta))
        setattr(slot.parent, slot.conv_name, layers[-1])
        setattr(slot.parent, slot.bn_name, nn.Identity())
    return layers


def _stage_names(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if info:
        return [entry["module"] for entry in info]
    return [name for name, _ in model.named_children()]


def _deepest_stage(model: nn.Module) -> str:
    info = getattr(model, "feature_info", None)
    if not info:
        raise ConfigError(
            f"{type(model).__name__} has no timm feature_info to take a default stage from; "
            "name the stages",
            field="stages",
            allowed=_stage_names(model),
        )
    return info[-1]["module"]


def _get_stage(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = _stage_names(model)
        raise ConfigError(
            f"{type(model).__name__} has no stage {name!r} for passport layers",
            field="stages",
            value=name,
            hint=close_match(name, names),
            allowed=names,
        ) from None


def _bn_stages(model: nn.Module) -> list[str]:
    return [n for n in _stage_names(model) if _has_bn(model.get_submodule(n))]


def _has_bn(module: nn.Module) -> bool:
    return any(type(m) is nn.BatchNorm2d for m in module.modules())


def _slots(model: nn.Module, name: str) -> list[_Slot]:
    stage = _get_stage(model, name)
    if passport_layers(stage):
        raise ConfigError("stage already has passport layers", field="stages", value=name)
    slots = [
        _slot(parent, child_name, ".".join(p for p in (name, path, child_name) if p))
        for path, parent in stage.named_modules()
        for child_name, child in parent.named_children()
        if type(child) is nn.BatchNorm2d
    ]
    if not slots:
        raise ConfigError(
            f"stage {name!r} of {type(model).__name__} has no BatchNorm2d to turn into a passport "
            "layer; passport layers need a CNN with BatchNorm2d (e.g. resnet18)",
            field="stages",
            value=name,
            allowed=_bn_stages(model) or "none (this model has no BatchNorm2d)",
        )
    return slots


def _slot(parent: nn.Module, bn_name: str, bn_path: str) -> _Slot:
    conv_name = _conv_name(parent, bn_name)
    conv = getattr(parent, conv_name, None) if conv_name else None
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(
            f"cannot find the conv feeding BatchNorm2d {bn_path!r}; supported layouts are "
            "bnK after convK in one block, and (..., Conv2d, BatchNorm2d) in an nn.Sequential",
            field="stages",
        )
    return _Slot(parent, conv_name, bn_name)


def _conv_name(parent: nn.Module, bn_name: str) -> str | None:
    """ResNet-family wiring: conv1 -> bn1 in a block; the previous item in a Sequential."""
    match = re.fullmatch(r"bn(\d+)", bn_name)
    if match:
        return f"conv{match[1]}"
    if isinstance(parent, nn.Sequential) and bn_name.isdigit() and int(bn_name) > 0:
        return str(int(bn_name) - 1)
    return None


def _capture_conv_inputs(model: nn.Module, convs: list[nn.Conv2d], image: Tensor) -> list[Tensor]:
    """What each conv receives while the model (eval mode, BN statistics untouched) sees `image`."""
    seen: dict[int, Tensor] = {}
    hooks = [conv.register_forward_pre_hook(_recorder(seen, i)) for i, conv in enumerate(convs)]
    modes = {m: m.training for m in model.modules()}
    batch = image.unsqueeze(0) if image.dim() == 3 else image
    try:
        model.eval()
        with torch.no_grad():
            model(batch.to(next(model.parameters())))
    finally:
        for module, training in modes.items():
            module.training = training
        for hook in hooks:
            hook.remove()
    return [seen[i] for i in range(len(convs))]


def _recorder(store: dict[int, Tensor], key: int):
    def hook(_module: nn.Module, args: tuple) -> None:
        store.setdefault(key, args[0].detach())

    return hook


def check_passport_stages(model: nn.Module, stages: list[str] | None) -> list[int]:
    """The channel count of every BatchNorm2d that `convert_to_passport(model, stages, ...)` would
    swap, without converting; raises the converter's ConfigErrors (unknown stage, no BN, no conv
    feeding a BN) and refuses a layer wider than one SHA-512 digest can sign."""
    names = stages or [_deepest_stage(model)]
    widths = []
    for name in names:
        for slot in _slots(model, name):
            _check_conv_bn(slot.conv, slot.bn)
            widths.append(slot.bn.num_features)
            if widths[-1] > SHA512_BITS:
                raise ConfigError(
                    f"a passport layer in stage {name!r} has {widths[-1]} channels but one "
                    f"SHA-512 signature holds {SHA512_BITS} bits (one per channel)",
                    field="stages",
                    value=name,
                    allowed=[s for s in _bn_stages(model) if _max_width(model, s) <= SHA512_BITS],
                )
    return widths


def _max_width(model: nn.Module, stage: str) -> int:
    return max(
        (m.num_features for m in model.get_submodule(stage).modules() if type(m) is nn.BatchNorm2d),
        default=0,
    )


def capture_passports(model: nn.Module, image: Tensor, *, grad: bool = False) -> list[Tensor]:
    """What each passport layer's conv sees while the model's deployment branch (eval mode, BN
    statistics untouched) runs on the passport image(s) `image` ((C, H, W) or (1, C, H, W)).

    This is how a passport image becomes per-layer passports on an already converted model (the
    converter does the same on the plain one). With `grad`, gradients reach `image` and the
    layers before each passport layer (what a forger optimising a passport image needs)."""
    layers = passport_layers(model)
    seen: dict[int, Tensor] = {}
    modes = {m: m.training for m in model.modules()}
    branch = [layer.mode for layer in layers]

    def recorder(key: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            seen.setdefault(key, args[0] if grad else args[0].detach())

        return hook

    hooks = [layer.conv.register_forward_pre_hook(recorder(i)) for i, layer in enumerate(layers)]
    batch = image.unsqueeze(0) if image.dim() == 3 else image
    try:
        model.eval()
        for layer in layers:
            layer.mode = Mode.DEPLOYMENT
        with torch.set_grad_enabled(grad):
            model(batch.to(next(model.parameters())))
    finally:
        for module, training in modes.items():
            module.training = training
        for layer, mode in zip(layers, branch, strict=True):
            layer.mode = mode
        for hook in hooks:
            hook.remove()
    return [seen[i] for i in range(len(layers))]


def set_passports(model: nn.Module, gamma: list[Tensor], beta: list[Tensor]) -> None:
    """Put per-layer passports (as from `capture_passports`) into the passport layers' buffers."""
    layers = passport_layers(model)
    if not len(layers) == len(gamma) == len(beta):
        raise ValueError(
            f"{len(layers)} passport layers but {len(gamma)} gamma and {len(beta)} beta passports"
        )
    for layer, g, b in zip(layers, gamma, beta, strict=True):
        layer.passport_gamma, layer.passport_beta = g, b


class ResidualTLP(nn.Module):
    """An ambiguity attacker's TLP: the model's TLP plus a residual perceptron that starts at zero
    (ERB), so training it can only move the verification branch away from where it was."""

    def __init__(self, base: nn.Module, channels: int) -> None:
        super().__init__()
        self.base, self.residual = base, TLP(channels)
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.residual(x)


def add_residual_tlp(model: nn.Module) -> list[ResidualTLP]:
    """Wrap every passport layer's TLP in a `ResidualTLP`; returns the new modules."""
    out = []
    for layer in passport_layers(model):
        layer.tlp = ResidualTLP(layer.tlp, layer.channels).to(layer.bn1.weight)
        out.append(layer.tlp)
    return out


def passport_wrapper(
    model: nn.Module, spec, stages: list[str] | None = None, residual_tlp: bool = False
) -> nn.Module:
    """The `passport` ModelSpec wrapper: the same passport layers on a fresh network, with zero
    placeholder passports of the right shapes (a stored state dict then fills every buffer);
    `residual_tlp` rebuilds a model an ERB attacker gave residual TLPs."""
    blank = torch.zeros(spec.in_chans, spec.img_size, spec.img_size)
    convert_to_passport(model, stages, blank, blank)
    if residual_tlp:
        add_residual_tlp(model)
    return model

