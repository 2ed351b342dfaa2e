"""Input flipping (WRT's `input_horizontal_flipping.py`; no paper): the deployment mirrors
every query before the model sees it. A model trained with flip augmentation keeps most of its
accuracy, while a trigger stamped at a fixed position (a corner patch) moves to the other
side. The weights are untouched (an `InputAttack`).

WRT flips horizontally only; `direction: vertical` is an addition (for data whose classes
are not mirror-symmetric left-right either way, e.g. digits, it shows what moving a trigger
costs the mark beside what the flip costs the task).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import InputAttack, register


class FlipParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    direction: Literal["horizontal", "vertical"] = Field(
        "horizontal", description="mirror left-right (WRT) or top-bottom"
    )


def flip(x: torch.Tensor, direction: str) -> torch.Tensor:
    return torch.flip(x, dims=[-1] if direction == "horizontal" else [-2])


@register("flip")
class Flip(InputAttack):
    Params = FlipParams

    def transform(self, x, modules):
        return flip(x, self.params.direction)
