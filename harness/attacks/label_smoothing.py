"""Label-smoothing fine-tuning (Szegedy et al., "Rethinking the Inception Architecture",
arXiv 1512.00567; WRT's `wrt/attacks/removal/label_smoothing.py`): fine-tune the marked model
on the attacker split at a high lr against smoothed targets, which flattens its confidence
everywhere - including on trigger images whose marked labels it holds only loosely.

Targets: (1 - epsilon) * t + epsilon / classes, where t is the marked model's softmax on the
attacker images (WRT's `true_labels: False`; `labels: true`: the one-hot ground truth), epsilon
0.3 (WRT), `epochs` 5 (WRT), at `lr_factor` (WRT: 10) times the train config's lr (WRT: its
checkpoint's lr x 10). Every target row still sums to one.

Departures from WRT:
- WRT's trainer smooths the targets as above, but its attack's loss then drops the 2nd..k-th
  largest entries of each target row (`top_k`), which its CIFAR-10 config leaves unset (WRT.md
  section 6: `torch.topk(k=None)` cannot run). Here there is no `top_k` step: the loss is the
  cross-entropy against the smoothed targets, the paper's label smoothing.
- Digits scale: WRT's 5 epochs are kept (~35x fewer steps than on its CIFAR-10 split). The lr
  is ten times the train config's, as in WRT: a train lr that is already high may diverge
  (a non-finite loss fails the cell); lower `lr_factor` then.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, register
from harness.attacks.weight_shifting import LABELS_DESCRIPTION, Labels, attacker_targets
from harness.training import fit


class LabelSmoothingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epsilon: float = Field(
        0.3, ge=0, lt=1, description="probability mass spread evenly over the classes (WRT: 0.3)"
    )
    epochs: int = Field(5, ge=1, description="fine-tuning epochs (WRT: 5)")
    lr_factor: float = Field(10.0, gt=0, le=1000, description="lr = this x train.lr (WRT: 10)")
    labels: Labels = Field("predicted", description=LABELS_DESCRIPTION)


def smooth(targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(1 - epsilon) * targets + epsilon / classes, row by row (rows of probabilities)."""
    return (1 - epsilon) * targets + epsilon / targets.shape[1]


@register("label_smoothing")
class LabelSmoothing(Attack):
    Params = LabelSmoothingParams

    @classmethod
    def tiny_params(cls) -> dict:
        return {"epochs": 1, "lr_factor": 2.0}

    def apply(self, model, ctx):
        p = self.params
        data = ctx.data.attacker
        targets = smooth(attacker_targets(model, ctx, data.x, data.y, p.labels), p.epsilon)
        fit(model, data.x, targets, ctx.train, ctx.device, ctx.seed, epochs=p.epochs,
            lr=p.lr_factor * ctx.train.lr)  # fmt: skip
        return Attacked(model)
