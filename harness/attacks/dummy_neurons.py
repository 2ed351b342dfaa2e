"""Dummy neurons (Yan et al., USENIX Security 2023): every hidden chain that
`harness.equivalence` finds gets `fraction` more channels, in pairs that cancel exactly.

A pair copies an existing channel j everywhere it is computed (its producers' weight rows and
biases, its BatchNorm statistics and affine, its depthwise filter - so both copies carry the
same values, through any activation or gate), and its consumers read the copies with weights
+g w_j and -g w_j (g: a random sign times a log-uniform gain in [0.5, 2]), which sum to zero.
With `shuffle` the widened chain is then randomly permuted, so the dummies do not sit last.

The layers change shape, so the attack returns a `widened` spec (`model_zoo.widen`) that
rebuilds them before the stored state dict is loaded; a model that had another wrapper
(passport layers) keeps it as the widened spec's base. Reports the largest |logit change| on
the attacker split (fp32) and how many channels were added.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, Metric, register
from harness.attacks.permute import ALLOWED, DEVIATION, chains_or_fail
from harness.equivalence import (
    check_arch_chains,
    exact_logits,
    max_logit_deviation,
    permute_chain,
    widen_chain,
)
from model_zoo.widen import widened_spec, widths_of


class DummyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fraction: float = Field(0.1, gt=0, le=1, description="channels added, as a share of each "
                            "chain's (in cancelling pairs; at least one pair)")  # fmt: skip
    shuffle: bool = Field(True, description="permute each widened chain (dummies not last)")
    layers: Literal["all"] | list[str] = Field(
        "all", description="producers (module paths) whose chains are widened, or all"
    )


@register("dummy_neurons")
class DummyNeurons(Attack):
    Params = DummyParams
    metrics = (
        DEVIATION,
        Metric("channels_changed", "hidden channels added (cancelling pairs)",
               higher_is_better=None),
    )  # fmt: skip

    def check_arch(self, arch: str, dataset) -> None:
        check_arch_chains(arch, dataset, self.params.layers, False, "widened", ALLOWED)

    def apply(self, model, ctx):
        p = self.params
        x = ctx.data.attacker.x
        before = exact_logits(model, x, ctx.device)
        g = torch.Generator().manual_seed(ctx.seed)
        added, resized = 0, {}
        for chain in chains_or_fail(model, ctx, p.layers, False, "widened"):
            pairs = max(1, round(p.fraction * chain.channels / 2))
            source = torch.randint(0, chain.channels, (pairs,), generator=g)
            sign = torch.randint(0, 2, (pairs,), generator=g).double() * 2 - 1
            gain = sign * torch.exp((torch.rand(pairs, generator=g).double() * 2 - 1) * math.log(2))
            for path in widen_chain(model, chain, source, gain):
                resized[path] = widths_of(model.get_submodule(path))
            wide = dataclasses.replace(chain, channels=chain.channels + 2 * pairs)
            if p.shuffle:
                permute_chain(model, wide, torch.randperm(wide.channels, generator=g))
            added += 2 * pairs
        deviation = max_logit_deviation(before, model, x, ctx.device)
        return Attacked(
            model,
            spec=widened_spec(ctx.spec, resized),
            metrics={"max_logit_deviation": deviation, "channels_changed": added},
        )
