"""Neuron rescaling (Yan et al., USENIX Security 2023): every hidden chain that
`harness.equivalence` finds positively homogeneous - ReLU / LeakyReLU / pooling between a
conv/linear and its consumers, residual adds included (a stream is scaled as one) - has its
signal multiplied by positive per-channel factors, log-uniform in [low, high], and divided back
in the consumers' input weights.

Where: a producer's weight rows and bias are scaled by t, a BatchNorm's running mean and shift
by t (its scale and variance kept: exact in eval mode, where BatchNorm is affine), a depthwise
conv's bias by t, the consumers' input columns by 1/t. ReLU6, hard-swish, GELU, gates and
LayerNorm do not commute with a per-channel scaling: chains through them are left alone, and an
arch with no other chain (ConvNeXt) is refused at validation. Reports the largest |logit
change| on the attacker split (fp32) and how many channels were rescaled.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.attacks.base import Attack, Attacked, Metric, register
from harness.attacks.permute import DEVIATION, chains_or_fail
from harness.equivalence import check_arch_chains, exact_logits, max_logit_deviation, scale_chain

ALLOWED = (
    "networks with a conv/linear feeding another through BatchNorm, depthwise convs, ReLU / "
    "LeakyReLU, pooling or residual adds only (positively homogeneous): lenet, ResNets, "
    "MobileNetV3 (its ReLU stages and squeeze-excite MLPs); not ConvNeXt (GELU, LayerNorm)"
)


class RescaleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: float = Field(0.5, gt=0, description="smallest per-channel factor")
    high: float = Field(2.0, gt=0, description="largest per-channel factor (log-uniform)")
    layers: Literal["all"] | list[str] = Field(
        "all", description="producers (module paths) whose chains are rescaled, or all"
    )

    @model_validator(mode="after")
    def _ordered(self):
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be at least low ({self.low})")
        return self


@register("rescale")
class Rescale(Attack):
    Params = RescaleParams
    metrics = (
        DEVIATION,
        Metric("channels_changed", "hidden channels rescaled", higher_is_better=None),
    )

    def check_arch(self, arch: str, dataset) -> None:
        check_arch_chains(arch, dataset, self.params.layers, True, "rescaled", ALLOWED)

    def apply(self, model, ctx):
        p = self.params
        x = ctx.data.attacker.x
        before = exact_logits(model, x, ctx.device)
        g = torch.Generator().manual_seed(ctx.seed)
        lo, hi = math.log(p.low), math.log(p.high)
        changed = 0
        for chain in chains_or_fail(model, ctx, p.layers, True, "rescaled"):
            factors = torch.exp(lo + (hi - lo) * torch.rand(chain.channels, generator=g))
            scale_chain(model, chain, factors.double())
            changed += chain.channels
        deviation = max_logit_deviation(before, model, x, ctx.device)
        return Attacked(model, metrics={"max_logit_deviation": deviation,
                                        "channels_changed": changed})  # fmt: skip
