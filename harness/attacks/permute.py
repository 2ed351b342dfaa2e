"""Neuron permutation (Yan et al., USENIX Security 2023, neural structural obfuscation): a
random reordering of the hidden channels of every chain `harness.equivalence` finds - a
conv/linear's output channels with the matching BatchNorm statistics and affine, depthwise
filters and the next conv/linear's input columns - which leaves the function unchanged.

Exact through any elementwise activation, squeeze-excite gates and residual adds (the producers
of a joined space move together: a ResNet stage's stream is permuted as one, from its stem or
downsample conv through every block). A white-box mark read from a layer's input-channel
layout (Uchida's kernel mean of a chain's consumer) or from a hidden activation (DeepSigns)
is scrambled; one read from output-channel averages alone is not. Reports the largest |logit
change| on the attacker split (fp32; ~1e-6) and how many channels moved.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, Metric, register
from harness.equivalence import (
    analyze,
    check_arch_chains,
    exact_logits,
    example_input,
    max_logit_deviation,
    permute_chain,
    select,
)
from harness.errors import CellFailed
from harness.training import as_float

ALLOWED = (
    "networks with a conv/linear feeding another through BatchNorm, depthwise convs, "
    "elementwise activations, pooling or residual adds (not LayerNorm): lenet, ResNets, "
    "MobileNetV3, ConvNeXt (its MLPs)"
)
DEVIATION = Metric(
    "max_logit_deviation",
    "largest |logit change| on the attacker split (function-preserving: ~0)",
    higher_is_better=None,
    agg="max",
)


class PermuteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: Literal["all"] | list[str] = Field(
        "all", description="producers (module paths) whose chains are permuted, or all"
    )


def probe(ctx) -> torch.Tensor:
    """A small batch shaped like the attacker's data, for tracing shapes."""
    x = ctx.data.attacker.x[:2]
    return as_float(x, ctx.device) if len(x) else example_input(ctx.spec, ctx.device)


def chains_or_fail(model, ctx, layers, rescale: bool, verb: str):
    found = analyze(model, probe(ctx))
    picked = select(found.usable(rescale), layers)
    if not picked:
        raise CellFailed(
            f"no hidden channel chain of this model can be {verb} exactly "
            f"({found.why_not(rescale)})"
        )
    return picked


@register("permute")
class Permute(Attack):
    Params = PermuteParams
    metrics = (
        DEVIATION,
        Metric("channels_changed", "hidden channels moved to another position",
               higher_is_better=None),
    )  # fmt: skip

    def check_arch(self, arch: str, dataset) -> None:
        check_arch_chains(arch, dataset, self.params.layers, False, "permuted", ALLOWED)

    def apply(self, model, ctx):
        x = ctx.data.attacker.x
        before = exact_logits(model, x, ctx.device)
        g = torch.Generator().manual_seed(ctx.seed)
        moved = 0
        for chain in chains_or_fail(model, ctx, self.params.layers, False, "permuted"):
            perm = torch.randperm(chain.channels, generator=g)
            permute_chain(model, chain, perm)
            moved += int((perm != torch.arange(chain.channels)).sum())
        deviation = max_logit_deviation(before, model, x, ctx.device)
        return Attacked(model, metrics={"max_logit_deviation": deviation,
                                        "channels_changed": moved})  # fmt: skip
