"""Input quantisation and feature squeezing: the deployment maps every pixel of every query to
one of `levels` values, which erases trigger patterns finer than a quantisation step. The
weights are untouched (an `InputAttack`). One attack with two grids, since both are the same
operation - a pixel snapped to the nearest of `levels` values - and differ only in where the
values lie:

- `mode: bins` (WRT's `input_quantization.py`, after arXiv 1904.08444): [0, 1] split
  into `levels` equal bins, each pixel replaced by its bin's midpoint (k + 0.5) / levels.
  WRT: 16 bins (variants 12, 10) - not powers of two, hence `levels` rather than bits.
- `mode: squeeze` (WRT's `feature_squeezing.py`, Xu et al., arXiv 1704.01155: bit-depth
  reduction): round(x (levels - 1)) / (levels - 1), grid points 0 and 1 included; WRT's bit
  depth 4 is `levels: 16`, i.e. round(15 x) / 15.

Departure from WRT: WRT's bin loop stops one bin short, so pixels in the top bin
[(levels - 1) / levels, 1] pass unquantised; here the top bin maps to its midpoint too.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import InputAttack, register


class InputQuantizeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["bins", "squeeze"] = Field(
        "bins", description="bins: bin midpoints (WRT input quantisation); squeeze: a grid "
        "with 0 and 1 (WRT feature squeezing)",
    )  # fmt: skip
    levels: int = Field(
        16, ge=2, le=256, description="values a pixel can take (WRT: 16 bins; 12, 10; "
        "squeezing to 4 bits: 16)",
    )  # fmt: skip


def quantize_inputs(x: torch.Tensor, levels: int, mode: str) -> torch.Tensor:
    """Each value of `x` (in [0, 1]) snapped to one of `levels` values (see the module doc)."""
    x = x.clamp(0, 1)
    if mode == "squeeze":
        return torch.round(x * (levels - 1)) / (levels - 1)
    return (torch.floor(x * levels).clamp_(max=levels - 1) + 0.5) / levels


@register("input_quantize")
class InputQuantize(InputAttack):
    Params = InputQuantizeParams

    def transform(self, x, modules):
        return quantize_inputs(x, self.params.levels, self.params.mode)
