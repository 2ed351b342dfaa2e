"""Input smoothing (Xu et al., "Feature Squeezing", arXiv 1704.01155; WRT's
`input_smoothing.py`): the deployment blurs every query - Gaussian, mean or median filter -
before the model sees it, which smears out the fine, high-frequency patterns a trigger may rely
on. The weights are untouched (an `InputAttack`) unless `fine_tune_epochs` > 0.

`kernel` is the filter's (odd) side; by default WRT's: for a Gaussian the odd ceil(6 sigma + 1)
(5 at WRT's sigma 0.5 and 0.6, 7 at 0.7), 3 x 3 for mean and median. WRT fine-tunes its mean /
median smoothing variants 20 epochs; here `fine_tune_epochs` (default 0: a predict-time
transform only) trains the whole model on the attacker split with ground-truth labels
(`fine_tune.train_on_attacker_data`) after the filter is installed, so that every training
image passes the filter, as the deployment's queries do.

Departures from WRT:
- Every filter pads by reflection (torchvision's `gaussian_blur`; the median and mean here).
  WRT pads its Gaussian and mean filters with zeros, which darkens a kernel's half-width of
  border on every image - an artefact of the implementation, not of the attack.
- WRT's smoothing preprocessor declares `apply_fit = False`: its fine-tuning appears to see the
  raw images. Here the model is fine-tuned on what it is served (the filtered images), which is
  what an attacker adapting the model to its own preprocessing would do.
- Fine-tuning epochs are not scaled by default (0); WRT's 20 CIFAR-10 epochs are a scenario
  choice, as are the lr (WRT: the checkpoint's) and the labels (ground truth here).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torchvision.transforms.functional import gaussian_blur

from harness.attacks.base import InputAttack, register
from harness.attacks.fine_tune import train_on_attacker_data
from harness.errors import ConfigError


class SmoothParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["gaussian", "median", "mean"] = Field("gaussian", description="the filter")
    kernel: int | None = Field(
        None,
        ge=3,
        description="odd filter side in pixels, at most the image size; default: gaussian the "
        "odd ceil(6 sigma + 1) (WRT: 5), mean / median 3 (WRT)",
    )
    sigma: float = Field(
        0.5, gt=0, le=100, description="gaussian only: std in pixels (WRT: 0.5; 0.6, 0.7)"
    )
    fine_tune_epochs: int = Field(
        0, ge=0, description="fine-tune the model on the filtered attacker split (WRT: 20 for "
        "mean / median); 0: the weights stay untouched",
    )  # fmt: skip
    lr: float = Field(0.01, gt=0, description="fine-tuning lr")

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int | None) -> int | None:
        if v is not None and v % 2 == 0:
            raise ValueError(f"must be odd (a filter centred on its pixel), e.g. {v + 1}")
        return v


def kernel_size(p: SmoothParams) -> int:
    """The filter side `p` asks for (see `SmoothParams.kernel`)."""
    if p.kernel is not None:
        return p.kernel
    if p.kind == "gaussian":
        k = math.ceil(6 * p.sigma + 1)
        return k + 1 - k % 2
    return 3


def _padded(x: torch.Tensor, k: int) -> torch.Tensor:
    half = k // 2
    return F.pad(x, (half, half, half, half), mode="reflect")


def median_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """The median of each pixel's k x k neighbourhood (reflect-padded), per channel."""
    windows = _padded(x, k).unfold(2, k, 1).unfold(3, k, 1)  # N x C x H x W x k x k
    return windows.flatten(-2).median(-1).values


def mean_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """The mean of each pixel's k x k neighbourhood (reflect-padded), per channel."""
    return F.avg_pool2d(_padded(x, k), k, stride=1)


def smooth(x: torch.Tensor, kind: str, k: int, sigma: float) -> torch.Tensor:
    """`x` (N x C x H x W) through a `kind` filter of side `k`."""
    if kind == "gaussian":
        return gaussian_blur(x, [k, k], [sigma, sigma])
    return median_filter(x, k) if kind == "median" else mean_filter(x, k)


@register("smooth")
class Smooth(InputAttack):
    Params = SmoothParams

    def check_data(self, dataset) -> None:
        k = kernel_size(self.params)
        if k > dataset.image_size:
            raise ConfigError(
                f"a {k} x {k} filter does not fit in the {dataset.image_size}-pixel images "
                "(dataset.image_size)",
                field="kernel",
                value=self.params.kernel if self.params.kernel is not None else k,
                allowed=f"odd sizes from 3 to {dataset.image_size}",
            )

    def transform(self, x, modules):
        p = self.params
        return smooth(x, p.kind, kernel_size(p), p.sigma)

    def apply(self, model, ctx):
        attacked = super().apply(model, ctx)  # the filter now runs on every input
        if self.params.fine_tune_epochs:
            train_on_attacker_data(
                attacked.model, ctx, 1.0, self.params.fine_tune_epochs, self.params.lr
            )
        return attacked
