"""Random occlusion of every query: the deployment covers a `size` x `size` square at a random
place of each image with `fill` (black, grey or the image's own per-channel mean) before the
model sees it - Cutout (DeVries & Taylor, arXiv 1708.04552) used as a predict-time transform.
A trigger that sits in one small region is blotted out on some queries; the task pays for the
covered share of the image. The weights are untouched (an `InputAttack`).

Not in WRT's input-preprocessing list: WRT's `random_occlusion.py` is a training-time defence
(fine-tuning on occluded copies of the attacker data, random rectangles up to half the side
filled with uniform noise). This is the predict-time counterpart, with a fixed square.

Each query gets its own square, drawn from a stream seeded by `seed` (`input_noise.FreshDraws`:
fresh per query, replayed identically wherever the deployment is rebuilt).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.attacks.base import InputAttack, register
from harness.attacks.input_noise import FreshDraws
from harness.errors import ConfigError


class OccludeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(8, ge=1, description="side of the square in pixels, at most the image's")
    fill: float | Literal["mean"] = Field(
        0.0, description="value of the covered pixels: a grey level in [0, 1], or 'mean' (the "
        "image's own mean, per channel)",
    )  # fmt: skip
    seed: int = Field(0, ge=0, description="seeds the stream of per-query squares")

    @field_validator("fill", mode="before")
    @classmethod
    def _grey_or_mean(cls, v):
        if v == "mean":
            return v
        try:
            value = float(v)
        except (TypeError, ValueError):
            value = None
        if isinstance(v, bool) or value is None or not 0 <= value <= 1:
            raise ValueError("must be a grey level in [0, 1] or 'mean'")
        return value


def occlude(
    x: torch.Tensor, size: int, fill: float | str, generator: torch.Generator
) -> torch.Tensor:
    """Each image of `x` (N x C x H x W) with a `size` square at a random place set to `fill`
    (a value, or "mean": the image's per-channel mean)."""
    n, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (n, 1), generator=generator, device=x.device)
    left = torch.randint(0, w - size + 1, (n, 1), generator=generator, device=x.device)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + size)  # N x H
    in_cols = (cols >= left) & (cols < left + size)  # N x W
    covered = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # N x 1 x H x W
    value = x.mean((2, 3), keepdim=True) if fill == "mean" else torch.tensor(fill, dtype=x.dtype)
    return torch.where(covered, value.to(x.device), x)


@register("occlude")
class Occlude(InputAttack):
    Params = OccludeParams

    def __init__(self, params: dict | None = None) -> None:
        super().__init__(params)
        self.draws = FreshDraws(self.params.seed)

    def check_data(self, dataset) -> None:
        if self.params.size > dataset.image_size:
            raise ConfigError(
                f"a square larger than the {dataset.image_size}-pixel images (dataset.image_size)",
                field="size",
                value=self.params.size,
                allowed=f"1 to {dataset.image_size}",
            )

    def transform(self, x, modules):
        p = self.params
        return occlude(x, p.size, p.fill, self.draws(x.device))
