"""Regularisation attack (Shafieinejad et al., "On the Robustness of the Backdoor-based
Watermarking in Deep Neural Networks", arXiv 1906.07745; WRT's
`wrt/attacks/removal/regularization.py`): fine-tune with a very strong L2 weight decay, which
shrinks every weight toward zero and wears away what the mark wrote into them, then fine-tune at
the original decay to win the task accuracy back.

Phase 1: `strong_epochs` (WRT: 5) with weight decay `strong_decay` (WRT: 0.1). Phase 2: up to
`epochs` (WRT: 50) at the train config's decay, stopped early when the cross-entropy on a
held-out 10 % of the attacker split has not strictly improved for `patience` epochs in a row
(WRT: 5); the last epoch's weights are kept, as WRT's callback does. Both phases train on the
other 90 % at `lr` (default: the train config's; WRT: its checkpoint's 0.1) with the marked
model's softmax as targets (WRT's default, `true_labels` unset; `labels: true`: ground truth).

Departures from WRT:
- WRT's early stopping measures the loss on its `valid_loader`, which is the test set: an
  attacker has no test set, so here the held-out share of its own split stands in.
- WRT keeps one optimiser at a constant lr; here each phase-2 epoch is one `training.fit` call,
  so each runs its own cosine schedule (lr annealed within the epoch and restarted).
- Digits scale: WRT's epoch counts are kept; on digits an epoch is ~35x fewer steps than on
  WRT's 16,666 CIFAR-10 images, so the strong decay shrinks the weights correspondingly less
  (raise `strong_epochs` or `strong_decay` to match WRT's total shrinkage).

Row figures: `strong_norm_ratio`, the L2 norm of all parameters after phase 1 over the norm
before, and `fine_tune_epochs`, the phase-2 epochs run before the stop.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, Metric, register
from harness.attacks.weight_shifting import LABELS_DESCRIPTION, Labels, attacker_targets
from harness.errors import CellFailed
from harness.training import fit, predict_logits

HOLDOUT = 0.1  # share of the attacker split held out for early stopping


class RegularizeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strong_epochs: int = Field(5, ge=1, description="epochs at the strong decay (WRT: 5)")
    strong_decay: float = Field(0.1, gt=0, le=10, description="weight decay of phase 1 (WRT: 0.1)")
    epochs: int = Field(
        50, ge=0, description="most fine-tuning epochs at train.weight_decay (WRT: 50)"
    )
    patience: int = Field(
        5, ge=1, description="stop after this many epochs without a better held-out loss (WRT: 5)"
    )
    lr: float | None = Field(None, gt=0, description="lr of both phases (default: train.lr)")
    labels: Labels = Field("predicted", description=LABELS_DESCRIPTION)


def weight_norm(model: nn.Module) -> float:
    """The L2 norm of all parameters (what weight decay pulls toward zero)."""
    return math.sqrt(sum(float(q.detach().float().pow(2).sum()) for q in model.parameters()))


def held_out_loss(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, device) -> float:
    return F.cross_entropy(predict_logits(model, x, device), targets).item()


@register("regularize")
class Regularize(Attack):
    Params = RegularizeParams
    metrics = (
        Metric("strong_norm_ratio", "parameter L2 norm after the strong-decay phase over "
               "before (< 1: shrunk)", higher_is_better=None),
        Metric("fine_tune_epochs", "fine-tuning epochs run before early stopping",
               higher_is_better=None),
    )  # fmt: skip

    @classmethod
    def tiny_params(cls) -> dict:
        return {"strong_epochs": 1, "epochs": 2, "patience": 1}

    def apply(self, model, ctx):
        p = self.params
        data = ctx.data.attacker
        targets = attacker_targets(model, ctx, data.x, data.y, p.labels)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(ctx.seed))
        n_val = max(1, round(HOLDOUT * len(data))) if p.epochs else 0
        if len(data) - n_val < 1:
            raise CellFailed(f"an attacker split of {len(data)} images leaves none to train on "
                             "beside the held-out share")  # fmt: skip
        val, train = order[:n_val], order[n_val:]
        x, t = data.x[train], targets[train]
        before = weight_norm(model)
        strong = ctx.train.model_copy(update={"weight_decay": p.strong_decay})
        fit(model, x, t, strong, ctx.device, ctx.seed, epochs=p.strong_epochs, lr=p.lr)
        ratio = weight_norm(model) / max(before, 1e-12)
        best, waited, run = math.inf, 0, 0
        while run < p.epochs and waited < p.patience:
            fit(model, x, t, ctx.train, ctx.device, ctx.seed + 1 + run, epochs=1, lr=p.lr)
            run += 1
            loss = held_out_loss(model, data.x[val], targets[val], ctx.device)
            best, waited = (loss, 0) if loss < best else (best, waited + 1)
        return Attacked(model, metrics={"strong_norm_ratio": ratio, "fine_tune_epochs": run})
