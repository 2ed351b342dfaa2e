"""Neural network laundering (Aiken, Kim, Woodbury, Computers & Security 2021, arXiv
2004.11368; WRT's `wrt/attacks/removal/laundering.py`): reverse-engineer the watermark's
trigger with Neural Cleanse, reset the neurons it excites, retrain.

What it does:
1. Neural Cleanse on the attacker split (`harness.attacks.neural_cleanse.cleanse`: a trigger
   per class, MAD outliers); the triggers used are the flagged ones, or the smallest.
2. Activation difference: every hidden channel space `harness.equivalence` finds (a chain:
   conv or linear producers, the channel-wise layers after them, the layers that read them)
   is measured where its consumers read it - after BatchNorm, activation and pooling - on the
   clean attacker images and on the same images stamped (round-robin over the used
   triggers). Per channel, the rise is WRT's: the mean over images of triggered minus clean,
   its largest value over positions (and over the consumers' read points of a residual
   stream).
3. Reset: a channel whose rise exceeds `conv_threshold` (channels of a conv; WRT 0.5) or
   `threshold` (neurons of a linear; WRT 0.2) TIMES THE LAYER'S SCALE - the largest mean
   clean activation of that read point, over channels and positions - has its input weights
   zeroed: its producers' weight rows and biases and its BatchNorm affine (so the channel
   outputs act(0), a constant, whatever the input). Its outgoing weights are kept.
4. Retraining `epochs` (WRT: 5) at `lr` (default: the scenario's train.lr; WRT runs at the
   checkpoint's) on the clean attacker images plus `triggered_share` of them (WRT: all)
   stamped, each keeping its own true label. Reset neurons are free to learn again, as in the
   paper: the retraining is what recovers the accuracy.

Why relative thresholds: WRT compares raw activation differences with 0.5 and 0.2, which
presumes the activation scale of its WRN (BatchNorm + ReLU outputs of order 1). Raw figures
mean nothing across architectures, widths and layers (a pre-logit ReLU of lenet and a
ResNet stream differ by orders of magnitude), so each layer's rise is read as a share of
that layer's own largest clean mean activation: 0.5 = the trigger lifts a channel by half of
what the layer's most active channel carries on clean data.

Figures: those of `neural_cleanse` (`flagged_classes`, `anomaly_index`, `trigger_l1`,
`smallest_trigger_class`, `trigger_success_before` / `_after`), `channels_reset` (conv
channels) and `neurons_reset` (linear neurons).

Departures from WRT:
- WRT's configs run the per-pair ("partial") Neural Cleanse and add triggered images of other
  classes relabelled to the least infected target; this runs the per-target search of
  `neural_cleanse` (K searches instead of K (K - 1)) and appends triggered images with their
  own labels only.
- WRT resets the units of the 20 activations its WRN returns; this resets the channels of
  every chain the equivalence analysis finds (the stream of a residual stage is one chain,
  reset as one), measured at their consumers' inputs. A network with no such chain is
  refused at validation.
- Thresholds are relative (above).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import Field

from harness.attacks.base import Attack, Attacked, Metric, register
from harness.attacks.fine_pruning import apply_masks, channel_masks
from harness.attacks.neural_cleanse import (
    CLEANSE_METRICS,
    CleanseParams,
    cleanse,
    stamp,
    stamped_copies,
    trigger_success,
)
from harness.attacks.permute import probe
from harness.equivalence import CONVS, Chain, analyze, arch_analysis
from harness.errors import CellFailed, ConfigError
from harness.training import fit, predict_logits


class LaunderingParams(CleanseParams):
    conv_threshold: float = Field(
        0.5, gt=0,
        description="reset a conv channel whose rise exceeds this share of its layer's "
        "largest clean mean activation (WRT: 0.5, absolute)",
    )  # fmt: skip
    threshold: float = Field(0.2, gt=0, description="the same for linear neurons (WRT: 0.2)")
    epochs: int = Field(5, ge=1, description="retraining epochs (WRT: 5)")
    lr: float | None = Field(None, gt=0, description="retraining lr (default: train.lr)")
    triggered_share: float = Field(
        1.0, gt=0, le=1,
        description="share of attacker images stamped and appended with their own labels "
        "(WRT: 1)",
    )  # fmt: skip


@torch.no_grad()
def read_means(
    model: nn.Module, chains: list[Chain], x: torch.Tensor, device
) -> dict[str, torch.Tensor]:
    """Per consumer of `chains`: the mean over `x` of its input, channels x positions."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for chain in chains:
        for path, inner in chain.consumers:
            conv = isinstance(model.get_submodule(path), CONVS)

            def hook(_m, args, path=path, inner=inner, conv=conv, channels=chain.channels):
                a = args[0].detach().float()
                if conv:  # N x C x H x W -> C x N x positions
                    a = a.transpose(0, 1).reshape(channels, a.shape[0], -1)
                else:  # ... x (C inner) -> C x rows x inner
                    a = a.reshape(-1, channels, inner).transpose(0, 1)
                s = a.sum(1, dtype=torch.float64).cpu()
                sums[path] = sums[path] + s if path in sums else s
                counts[path] = counts.get(path, 0) + a.shape[1]

            handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    try:
        predict_logits(model, x, device)
    finally:
        for h in handles:
            h.remove()
    return {path: s / counts[path] for path, s in sums.items()}


def rises(clean: dict[str, torch.Tensor], triggered: dict[str, torch.Tensor], chain: Chain):
    """Per channel of `chain`: the largest rise over positions and read points, as a share of
    each read point's largest clean mean activation."""
    out = torch.full((chain.channels,), float("-inf"), dtype=torch.float64)
    for path, _ in chain.consumers:
        scale = clean[path].abs().max().clamp_min(1e-12)
        out = torch.maximum(out, ((triggered[path] - clean[path]) / scale).amax(1))
    return out


@register("neural_laundering")
class NeuralLaundering(Attack):
    Params = LaunderingParams
    metrics = (
        *CLEANSE_METRICS,
        Metric("channels_reset", "conv channels whose input weights were zeroed",
               higher_is_better=None),
        Metric("neurons_reset", "linear neurons whose input weights were zeroed",
               higher_is_better=None),
    )  # fmt: skip

    @classmethod
    def tiny_params(cls) -> dict:
        return {"steps": 20, "batch_size": 16, "epochs": 1}

    def check_arch(self, arch: str, dataset) -> None:
        found = arch_analysis(
            arch, max(2, dataset.num_classes or 10), dataset.channels, dataset.image_size
        )
        if not found.chains:
            raise ConfigError(
                f"arch {arch!r}: no hidden channel space whose neurons can be reset "
                f"({found.why_not()})",
                value=arch,
                allowed="networks with a conv/linear feeding another (lenet, ResNets, "
                "MobileNetV3, ...)",
            )

    def apply(self, model, ctx):
        p = self.params
        data = ctx.data.attacker
        chains = analyze(model, probe(ctx)).chains
        if not chains:
            raise CellFailed("no hidden channel space whose neurons can be reset")
        found = cleanse(model, ctx, p)
        clean = read_means(model, chains, data.x, ctx.device)
        triggered = read_means(model, chains, stamp(data.x, found.used), ctx.device)
        counts = {"channels_reset": 0, "neurons_reset": 0}
        for chain in chains:
            conv = isinstance(model.get_submodule(chain.producers[0]), CONVS)
            limit = p.conv_threshold if conv else p.threshold
            reset = torch.nonzero(rises(clean, triggered, chain) > limit).flatten()
            if len(reset):
                apply_masks(model, channel_masks(model, chain, reset, consumers=False))
            counts["channels_reset" if conv else "neurons_reset"] += len(reset)
        x_t, y_t = stamped_copies(ctx, found.used, p.triggered_share)
        x, y = torch.cat([data.x, x_t]), torch.cat([data.y, y_t])
        fit(model, x, y, ctx.train, ctx.device, ctx.seed, epochs=p.epochs, lr=p.lr)
        figures = {**found.figures, **{k: float(v) for k, v in counts.items()}}
        figures["trigger_success_after"] = trigger_success(
            model, found.used, data.x, data.y, ctx.device
        )
        return Attacked(model, metrics=figures)
