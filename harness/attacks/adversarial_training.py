"""Adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", arXiv 1706.06083; WRT's `wrt/attacks/removal/adversarial_training.py`): the attacker
hardens the marked model against small input perturbations, which moves its decision
boundaries - where frontier-stitching and other boundary keys live.

`epochs` rounds (WRT: 5). Each round, for every `eps` (WRT: 0.01, 0.1, 0.25): `samples` (WRT:
1,000) attacker images drawn at random are pushed by L-inf PGD (`pgd` below: `iters` (WRT: 40)
signed-gradient steps of `step` (WRT: 0.01) up the cross-entropy, each projected back onto the
eps ball around the image and onto the [0, 1] box; no random start), appended to the attacker
split with the targets of their clean originals, then one epoch of training on the lot, without
augmentation (WRT's `apply_augmentation: False`). PGD ascends the loss of the model's current
prediction on the clean image, as WRT's ART attack does when given no labels; the training
targets are the marked model's softmax (WRT's `true_labels: False`; `labels: true`: ground
truth). eps and step are in [0, 1] pixel units, as WRT's, whose PGD also runs on unnormalised
images.

Departures from WRT:
- Each round's epoch is one `training.fit` call at `lr` (default: the train config's; WRT: its
  checkpoint's 0.1), so each runs its own cosine schedule; WRT keeps one constant-lr optimiser.
- Digits scale: `samples` is capped at the attacker split (~480 digits images, against WRT's
  16,666): every image is then perturbed once per eps and round. WRT's 5 rounds are kept.

Row figure: `adv_flip_rate`, the share of PGD images whose prediction left the clean image's
(mean over rounds and eps): how far the attack's own perturbations reached.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, Metric, register
from harness.attacks.weight_shifting import LABELS_DESCRIPTION, Labels, attacker_targets
from harness.training import as_float, autocast, fit, predict_logits

Eps = Annotated[float, Field(gt=0, le=1)]


class AdversarialTrainingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(5, ge=1, le=1000, description="rounds of PGD then one epoch (WRT: 5)")
    eps: list[Eps] = Field(
        [0.01, 0.1, 0.25], min_length=1,
        description="L-inf radii in [0, 1] pixel units, one PGD set each (WRT: 0.01, 0.1, 0.25)",
    )  # fmt: skip
    step: float = Field(0.01, gt=0, le=1, description="PGD step size (WRT: 0.01)")
    iters: int = Field(40, ge=1, le=10_000, description="PGD steps (WRT: 40)")
    samples: int = Field(
        1000, ge=1, description="attacker images per eps and round (WRT: 1,000; capped at the "
        "split)",
    )  # fmt: skip
    lr: float | None = Field(None, gt=0, description="training lr (default: train.lr)")
    labels: Labels = Field("predicted", description=LABELS_DESCRIPTION)


def pgd(model: nn.Module, x: torch.Tensor, eps: float, step: float, iters: int, device,
        labels: torch.Tensor | None = None, batch: int = 256) -> torch.Tensor:  # fmt: skip
    """L-inf PGD without random start (Madry et al.): `iters` steps of `step` times the sign of
    the input gradient of the cross-entropy, each projected onto the `eps` ball around the
    image and the [0, 1] box. `labels`: the classes whose loss is ascended (default: the
    model's own predictions on `x`). Returns float images in [0, 1] on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        clean = as_float(x[i : i + batch], device)
        with torch.no_grad(), autocast(device):
            goal = model(clean).argmax(1) if labels is None else labels[i : i + batch].to(device)
        adv = clean.clone()
        for _ in range(iters):
            adv.requires_grad_(True)
            with autocast(device):
                loss = F.cross_entropy(model(adv).float(), goal)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + step * grad.sign()
            adv = torch.min(torch.max(adv, clean - eps), clean + eps).clamp_(0, 1)
        out.append(adv.cpu())
    return torch.cat(out)


@register("adversarial_training")
class AdversarialTraining(Attack):
    Params = AdversarialTrainingParams
    metrics = (Metric("adv_flip_rate", "share of PGD images whose prediction left the clean "
                      "image's (mean over rounds and eps)", higher_is_better=None),)  # fmt: skip

    @classmethod
    def tiny_params(cls) -> dict:
        return {"epochs": 1, "eps": [0.1], "iters": 3, "samples": 32}

    def apply(self, model, ctx):
        p = self.params
        data = ctx.data.attacker
        x = as_float(data.x)
        targets = attacker_targets(model, ctx, data.x, data.y, p.labels)
        plain = ctx.train.model_copy(update={"augment": False})
        g = torch.Generator().manual_seed(ctx.seed)
        flips = []
        for round_ in range(p.epochs):
            xs, ts = [x], [targets]
            for eps in p.eps:
                pick = torch.randperm(len(data), generator=g)[: p.samples]
                clean = predict_logits(model, x[pick], ctx.device).argmax(1)
                adv = pgd(model, x[pick], eps, p.step, p.iters, ctx.device, labels=clean)
                moved = predict_logits(model, adv, ctx.device).argmax(1) != clean
                flips.append(moved.float().mean().item())
                xs.append(adv)
                ts.append(targets[pick])
            fit(model, torch.cat(xs), torch.cat(ts), plain, ctx.device, ctx.seed + round_,
                epochs=1, lr=p.lr)  # fmt: skip
        return Attacked(model, metrics={"adv_flip_rate": sum(flips) / len(flips)})
