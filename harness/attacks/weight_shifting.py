"""Weight shifting (WRT's own attack, Lukas et al., IEEE S&P 2022; WRT's
`wrt/attacks/removal/weight_shifting.py`): every convolution's filters are all moved by a
multiple of their mean, plus Gaussian noise, then the model is fine-tuned on the attacker split.

For each conv weight W (out x in x kh x kw):

    W <- W - shift * mean_out(W) - noise * N(0, std(W)^2)

where mean_out(W) is the mean over the output channels (the filters): exactly the kernel mean
that Uchida (`harness.methods.uchida.kernel_mean`) and DeepMarks project their marks from. The
kernel mean thus becomes (1 - shift) times the old one plus the filters' mean of the noise: at
WRT's shift 1.5 (variant 2.5) every projection of it changes sign, up to that noise. std(W) is
the whole tensor's, as in WRT; the noise is drawn from the cell's seed. Every `nn.Conv2d` of
the network is shifted (WRT: every parameter whose name holds "conv" and "weight", i.e. the
WRN's convolutions); linear layers, BatchNorm and the parts of an input transform an earlier
attack put in front of the network are left as they are. Then `epochs` of fine-tuning on the
attacker split (WRT: 10) at `lr` (default: the train config's; WRT runs at its checkpoint's
0.1) with the marked model's softmax as targets (WRT's `true_labels: False`; `labels: true`
trains on ground truth).

Digits scale: WRT's 10 epochs are kept; on a 1,797-image set the attacker split is ~35x smaller
than WRT's 16,666 CIFAR-10 images, so the same epochs are that many fewer steps. `epochs: 0`
shifts without fine-tuning (the shift alone).

`attacker_targets` here is what every WRT fine-tuning attack of this package trains on.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import TRANSFORM_PREFIX, Attack, Attacked, Metric, register
from harness.training import fit, predict_logits

Labels = Literal["predicted", "true"]
LABELS_DESCRIPTION = (
    "training targets: the marked model's softmax on the attacker images (WRT's "
    "`true_labels: False`, its default) or the attacker split's ground truth"
)


def attacker_targets(model: nn.Module, ctx, x: torch.Tensor, y: torch.Tensor,
                     labels: Labels) -> torch.Tensor:  # fmt: skip
    """One row of class probabilities per attacker image (CPU, float): the marked model's
    softmax on the unaugmented images (`predicted`; the attacker holds the weights, so it asks
    the model itself, not the served API) or the one-hot ground truth (`true`)."""
    if labels == "true":
        return F.one_hot(y, ctx.spec.num_classes).float()
    return predict_logits(model, x, ctx.device).softmax(1)


@torch.no_grad()
def shift_filters(model: nn.Module, shift: float, noise: float, generator: torch.Generator) -> int:
    """Shift every conv's filters by `shift` times their mean and add `noise` times Gaussian
    noise of the tensor's std (drawn on the CPU from `generator`); returns how many convs. The
    parts of an input transform an earlier attack installed in front are not the network's."""
    convs = [m for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and not name.startswith(TRANSFORM_PREFIX)]  # fmt: skip
    for conv in convs:
        w = conv.weight
        draw = torch.randn(w.shape, generator=generator).to(w.device, w.dtype)
        w -= shift * w.mean(0) + noise * w.std() * draw
    return len(convs)


class WeightShiftingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shift: float = Field(
        1.5, ge=0, le=100, description="lambda: multiple of the filters' mean subtracted from "
        "every filter (WRT: 1.5; 2.5)",
    )  # fmt: skip
    noise: float = Field(
        1.0, ge=0, le=100, description="lambda_2: Gaussian noise added, in units of the "
        "weight's std (WRT: 1)",
    )  # fmt: skip
    epochs: int = Field(10, ge=0, description="fine-tuning epochs after the shift (WRT: 10)")
    lr: float | None = Field(None, gt=0, description="fine-tuning lr (default: train.lr)")
    labels: Labels = Field("predicted", description=LABELS_DESCRIPTION)


@register("weight_shifting")
class WeightShifting(Attack):
    Params = WeightShiftingParams
    metrics = (Metric("convs_shifted", "convolutions whose filters were shifted",
                      higher_is_better=None),)  # fmt: skip

    @classmethod
    def tiny_params(cls) -> dict:
        return {"epochs": 1}

    def apply(self, model, ctx):
        p = self.params
        data = ctx.data.attacker
        targets = attacker_targets(model, ctx, data.x, data.y, p.labels)
        shifted = shift_filters(model, p.shift, p.noise, torch.Generator().manual_seed(ctx.seed))
        if p.epochs:
            fit(model, data.x, targets, ctx.train, ctx.device, ctx.seed, epochs=p.epochs,
                lr=p.lr)  # fmt: skip
        return Attacked(model, metrics={"convs_shifted": shifted})
