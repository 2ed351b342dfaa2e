"""Weight-only fake quantisation of every conv / linear weight at k bits.

`per_channel`: asymmetric min-max per output channel; `per_tensor`: one min-max range per
tensor (the discriminative-samples paper's 8-bit reading). Works on any device, unlike
torch's deprecated Linear-only `quantize_dynamic`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, register
from harness.attacks.prune import prunable


class QuantizeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bits: int = Field(8, ge=1, le=16)
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"


@torch.no_grad()
def fake_quantize(w: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    scale = (hi - lo).clamp_min(1e-12) / (2**bits - 1)
    q = torch.round((flat - lo) / scale).clamp(0, 2**bits - 1)
    return (q * scale + lo).reshape(w.shape)


@register("quantize")
class Quantize(Attack):
    Params = QuantizeParams

    def apply(self, model, ctx):
        per_channel = self.params.granularity == "per_channel"
        for module, _ in prunable(model):
            module.weight.data = fake_quantize(module.weight.data, self.params.bits, per_channel)
        return Attacked(model)
