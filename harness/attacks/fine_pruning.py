"""Fine-pruning (Liu, Dolan-Gavitt, Garg, RAID 2018, arXiv 1805.12185; WRT's
`wrt/attacks/removal/fine_pruning.py`): mask the channels of the last conv stage that stay
most dormant on clean data, then fine-tune on the attacker's split.

What it does:
1. The stage: `layer` if given, else the last conv stage's output - a timm model's
   ``feature_info[-1]["module"]`` (``layer4`` of a ResNet, ``blocks.5`` of MobileNetV3-Small),
   or for a network without feature_info (lenet) the activation that follows the last Conv2d.
2. The mean activation of each of its channels over the attacker's images (eval mode).
3. The ``floor(ratio x channels)`` lowest channels (at least one) are masked in the weights,
   so that the stored state dict alone carries the mask (no hook, no new module: the model is
   rebuilt by ``create_model(spec)`` + ``load_state_dict``). The stage's channel space is the
   `harness.equivalence` chain holding the last conv at or before that output; for a ResNet
   stage it is the whole residual stream (the downsample conv and every block's last conv,
   which add into it). Masking zeroes, for each masked channel, the producers' weight rows
   and biases, the channel-wise layers on the way (BatchNorm affine, depthwise filters) and
   the consumers' input columns. The channel is then exactly 0 at the stage output after any
   activation with f(0) = 0 (ReLU, GELU, SiLU, hard-swish), a constant otherwise, and nothing
   downstream reads it. This is checked on the attacker's images after masking (a failed
   check fails the cell) and on a fresh network at validation.
4. `epochs` of fine-tuning at `lr` on the attacker split, against the marked model's softmax
   as soft targets (WRT's predicted labels) or the ground truth (`labels: true`). The masks
   are held during fine-tuning (``torch.nn.utils.prune.custom_from_mask``, removed
   afterwards): masked weights get no gradient and no weight decay, so the channels stay
   masked.

Figures: `channels_pruned`, and `pruned_activation_share`, the pruned channels' share of the
stage's positive mean-activation mass on clean data (how much the network used them).

Departures from WRT:
- WRT masks single units (channel x position, C x H x W) of the stage output with a wrapper
  module that multiplies by a mask; a position-wise mask cannot be written into conv weights,
  and a wrapper is structure the store cannot rebuild, so whole channels are masked, which is
  what Liu et al. prune (the last conv layer's filters).
- WRT's stage is WRN-16-6's layer3 output (384 x 8 x 8 units; ratio 0.96 keeps 4 % of them).
  Counted in channels, the same ratio keeps very few of a narrow last stage: 2 of lenet's 32
  (15 of a 384-channel stage).
- Liu et al. prune channel by channel and stop at a clean-accuracy drop the defender sets;
  WRT (and this) prune a fixed ratio in one step.
- `epochs` 10 and `lr` 0.001 are WRT's; WRT fine-tunes with the checkpoint's optimiser (SGD
  with momentum), this uses the scenario's `train` optimiser and a cosine schedule
  (`harness.training.fit`).

A model whose last stage cannot be masked exactly because of the marked model's own layers
(a Steganographic Passport's PassportNorm is opaque to `harness.equivalence`) is pruned at the
deepest conv stage that can be; the row's `stages_skipped` counts the stages passed over.

Arches whose last stage is not a chain that can be masked exactly (ConvNeXt: LayerNorm on the
stream; VGG: timm's ConvMlp head reads it; DenseNet: concatenations; ViT: tokens) are refused
at validation (exit 2).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import TRANSFORM_PREFIX, Attack, Attacked, Metric, register
from harness.attacks.permute import probe
from harness.attacks.weight_shifting import attacker_targets
from harness.equivalence import (
    ACT_MODULES,
    LINEARS,
    Chain,
    analyze,
    exact_logits,
    example_input,
    expand,
)
from harness.errors import CellFailed, ConfigError
from harness.training import as_float, fit, predict_logits
from model_zoo import ModelSpec, create_model

ALLOWED = (
    "networks whose last conv stage is a channel space harness.equivalence can rewrite "
    "(BatchNorm, elementwise activations, pooling, residual adds): lenet, ResNets, "
    "MobileNetV3, EfficientNet"
)
NOT_ACTIVATIONS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
Masks = dict[tuple[str, str], torch.Tensor]  # (module path, parameter name) -> 0/1 mask


class FinePruningParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(0.96, gt=0, lt=1, description="share of the stage's channels masked, "
                         "the most dormant first (WRT: 0.96)")  # fmt: skip
    epochs: int = Field(10, ge=0, description="fine-tuning epochs after masking (WRT: 10; "
                        "0: mask only)")  # fmt: skip
    lr: float = Field(0.001, gt=0, description="fine-tuning lr (WRT: 0.001)")
    labels: Literal["predicted", "true"] = Field(
        "predicted", description="fine-tuning targets: the marked model's softmax (WRT) or "
        "the attacker's ground truth"
    )  # fmt: skip
    layer: str | None = Field(
        None, description="module whose output channels are pruned (default: the last conv "
        "stage's output)"
    )  # fmt: skip


# ----------------------------------------------------------------------------- the stage


class StageError(ValueError):
    """No channel space of the asked layer can be masked exactly (the message says why)."""


@dataclass(frozen=True)
class Stage:
    layer: str  # module whose output is measured and masked
    chain: Chain  # the channel space of that output


def network_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules in order, without an input transform's parts (an earlier attack's
    autoencoder, `harness.attacks.base.install_transform`)."""
    return [(p, m) for p, m in model.named_modules() if not p.startswith(TRANSFORM_PREFIX)]


def default_layers(model: nn.Module) -> list[str]:
    """The conv stages' outputs, deepest first: timm's feature modules, else `default_layer`."""
    for prefix, module in model.named_modules():
        info = getattr(module, "feature_info", None)
        if isinstance(info, list) and info and all(isinstance(f, dict) for f in info):
            stages = [f["module"] for f in info if "module" in f]
            if stages:
                return [".".join(p for p in (prefix, m) if p) for m in reversed(stages)]
    layer = default_layer(model)
    return [layer] if layer is not None else []


def default_layer(model: nn.Module) -> str | None:
    """The last conv stage's output: timm's last feature module, else the first activation
    after the last Conv2d (before any other conv / linear), else that Conv2d."""
    for prefix, module in model.named_modules():
        info = getattr(module, "feature_info", None)
        if isinstance(info, list) and info and isinstance(info[-1], dict):
            if "module" in info[-1]:
                return ".".join(p for p in (prefix, info[-1]["module"]) if p)
    mods = network_modules(model)
    convs = [i for i, (_, m) in enumerate(mods) if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    for path, m in mods[convs[-1] + 1 :]:
        if isinstance(m, (nn.Conv2d, *LINEARS)):
            break
        if type(m) in ACT_MODULES and not isinstance(m, NOT_ACTIVATIONS):
            return path
    return mods[convs[-1]][0]


def locate(model: nn.Module, example: torch.Tensor, layer: str | None = None) -> Stage:
    """`layer`'s (default: `default_layer`'s) channel space: the chain holding the last Conv2d
    at or before the end of that module (in module order), whose width must be the width of
    the module's output. Raises `StageError`."""
    layer = layer or default_layer(model)
    if layer is None:
        raise StageError("the network has no Conv2d")
    mods = network_modules(model)
    inside = [i for i, (p, _) in enumerate(mods) if p == layer or p.startswith(layer + ".")]
    if not inside:
        raise StageError(f"no module {layer!r} in the network")
    convs = [p for p, m in mods[: inside[-1] + 1] if isinstance(m, nn.Conv2d)]
    if not convs:
        raise StageError(f"no Conv2d at or before {layer!r}")
    found = analyze(model, example)
    chain = next((c for c in found.chains if convs[-1] in (*c.producers, *c.through)), None)
    if chain is None:
        raise StageError(
            f"the channels {convs[-1]!r} produces (the stage {layer!r}) cannot be masked "
            f"exactly ({found.why_not()})"
        )
    out = layer_output(model, layer, example)
    if out.dim() < 2 or out.shape[1] != chain.channels:
        raise StageError(
            f"{layer!r} outputs shape {tuple(out.shape)}, not the {chain.channels} channels of "
            f"{convs[-1]!r}"
        )
    return Stage(layer, chain)


@functools.lru_cache(maxsize=32)
def _arch_problem(
    arch: str, num_classes: int, in_chans: int, img_size: int, layer: str | None
) -> str | None:
    spec = ModelSpec(arch, num_classes, in_chans, img_size)
    model = create_model(spec).eval()
    x = example_input(spec)
    try:
        stage = locate(model, x, layer)
    except StageError as e:
        return str(e)
    every = torch.arange(stage.chain.channels)
    apply_masks(model, channel_masks(model, stage.chain, every))
    if not is_silent(model, stage.layer, every, x):
        return f"masking the weights does not silence the channels of {stage.layer!r}"
    return None


def check_stage(arch: str, dataset, layer: str | None) -> None:
    """Refuse (ConfigError, field `layer`) an arch whose stage cannot be masked exactly:
    builds a fresh network, masks every channel of the stage and checks them constant."""
    num_classes = max(2, dataset.num_classes or 10)
    problem = _arch_problem(arch, num_classes, dataset.channels, dataset.image_size, layer)
    if problem is not None:
        raise ConfigError(f"arch {arch!r}: {problem}", field="layer", value=layer,
                          allowed=ALLOWED)  # fmt: skip


def stage_or_fail(model: nn.Module, ctx, layer: str | None) -> tuple[Stage, int]:
    """`layer`'s stage, or by default the deepest conv stage that can be masked exactly, and
    how many deeper stages were passed over (a marked model's own layers - passport layers -
    can make the last stage opaque to the rewrite); a CellFailed when there is none."""
    candidates = [layer] if layer is not None else default_layers(model)
    errors = []
    for skipped, name in enumerate(candidates):
        try:
            return locate(model, probe(ctx), name), skipped
        except StageError as e:
            errors.append(str(e))
    raise CellFailed(f"no prunable conv stage: {errors[0] if errors else 'no Conv2d'}")


# ----------------------------------------------------------------------------- activations


@torch.no_grad()
def layer_means(
    model: nn.Module, layer: str, x: torch.Tensor, device, batch_size: int = 256
) -> torch.Tensor:
    """Mean activation of each channel (dim 1) of `layer`'s output over the images `x`, in
    eval mode (float64, on the CPU)."""
    total: list[torch.Tensor] = []
    count = [0]

    def hook(_module, _args, out) -> None:
        flat = out.detach().float().transpose(0, 1).reshape(out.shape[1], -1)
        total.append(flat.sum(1, dtype=torch.float64).cpu())
        count[0] += flat.shape[1]

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        predict_logits(model, x, device, batch_size)
    finally:
        handle.remove()
    return torch.stack(total).sum(0) / max(count[0], 1)


@torch.no_grad()
def layer_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """`layer`'s output on `x` (float images on the model's device), eval mode, full fp32."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(
        lambda _m, _a, out: seen.append(out.detach().float().clone())
    )
    try:
        exact_logits(model, x, x.device)
    finally:
        handle.remove()
    if not seen or not isinstance(seen[0], torch.Tensor):
        raise StageError(f"{layer!r} returns no tensor in the forward pass")
    return torch.cat(seen)


def is_silent(model: nn.Module, layer: str, channels: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `channels` of `layer`'s output are constant (each one its own value) on `x`."""
    out = layer_output(model, layer, x)[:, channels.to(x.device)]
    flat = out.transpose(0, 1).reshape(len(channels), -1)
    return bool((flat == flat[:, :1]).all())


# ----------------------------------------------------------------------------- masking


def channel_masks(
    model: nn.Module, chain: Chain, channels: torch.Tensor, consumers: bool = True
) -> Masks:
    """0/1 masks that silence `channels` of `chain`: its producers' weight rows and biases,
    the channel-wise layers' parameters (BatchNorm affine, depthwise filters) and, with
    `consumers`, the input columns that read them."""
    masks: Masks = {}
    for slot in chain.slots(model):
        if slot.role == "in" and not consumers:
            continue
        t = getattr(model.get_submodule(slot.path), slot.name)
        if not isinstance(t, nn.Parameter):
            continue  # BatchNorm running statistics: a zero scale and shift silence anyway
        key = (slot.path, slot.name)
        mask = masks.get(key, torch.ones_like(t.data))
        mask.index_fill_(slot.dim, expand(channels.to(t.device), slot.inner), 0.0)
        masks[key] = mask
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    for (path, name), mask in masks.items():
        getattr(model.get_submodule(path), name).data.mul_(mask)


@contextlib.contextmanager
def masks_held(model: nn.Module, masks: Masks) -> Iterator[None]:
    """Keep `masks` applied while training (`torch.nn.utils.prune` reparametrisation: masked
    entries get no gradient); made permanent and the state dict's names restored on exit."""
    for (path, name), mask in masks.items():
        tprune.custom_from_mask(model.get_submodule(path), name, mask)
    try:
        yield
    finally:
        for path, name in masks:
            tprune.remove(model.get_submodule(path), name)


def mask_stage(model: nn.Module, ctx, stage: Stage, channels: torch.Tensor) -> Masks:
    """Mask `channels` of the stage and check them silent on the attacker's images."""
    masks = channel_masks(model, stage.chain, channels)
    apply_masks(model, masks)
    x = ctx.data.attacker.x[:64]
    x = as_float(x, ctx.device) if len(x) else probe(ctx)
    if not is_silent(model, stage.layer, channels, x):
        raise CellFailed(f"masking the weights left channels of {stage.layer!r} active")
    return masks


def n_masked(ratio: float, channels: int) -> int:
    """WRT's floor(ratio x units), at least one (ratio < 1 leaves at least one)."""
    return max(1, math.floor(ratio * channels))


@register("fine_pruning")
class FinePruning(Attack):
    Params = FinePruningParams
    metrics = (
        Metric("channels_pruned", "channels of the last conv stage masked",
               higher_is_better=None),
        Metric("pruned_activation_share", "the masked channels' share of the stage's positive "
               "mean activation on clean attacker data (0: they were dead)",
               higher_is_better=None),
        Metric("stages_skipped", "deeper conv stages passed over: they cannot be masked "
               "exactly in this model (passport layers)", higher_is_better=None),
    )  # fmt: skip

    @classmethod
    def tiny_params(cls) -> dict:
        return {"ratio": 0.5, "epochs": 1}

    def check_arch(self, arch: str, dataset) -> None:
        check_stage(arch, dataset, self.params.layer)

    def apply(self, model, ctx):
        p = self.params
        data = ctx.data.attacker
        stage, skipped = stage_or_fail(model, ctx, p.layer)
        means = layer_means(model, stage.layer, data.x, ctx.device)
        k = n_masked(p.ratio, stage.chain.channels)
        pruned = torch.argsort(means, stable=True)[:k]
        mass = means.clamp_min(0)
        share = float(mass[pruned].sum() / mass.sum()) if mass.sum() > 0 else 0.0
        targets = attacker_targets(model, ctx, data.x, data.y, p.labels)  # soft, as WRT
        masks = mask_stage(model, ctx, stage, pruned)
        if p.epochs:
            with masks_held(model, masks):
                fit(model, data.x, targets, ctx.train, ctx.device, ctx.seed, epochs=p.epochs,
                    lr=p.lr)  # fmt: skip
        return Attacked(
            model,
            metrics={"channels_pruned": float(k), "pruned_activation_share": share,
                     "stages_skipped": float(skipped)},  # fmt: skip
        )
