"""Fine-tuning removal attacks on the attacker's split: FTLL, FTAL, RTLL, RTAL (WRT's names).

FT* keep the head, RT* re-initialise it first; *LL trains the last layer only (features and
BatchNorm statistics frozen), *AL trains all layers.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, register
from harness.training import fit


class FineTuneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["ftll", "ftal", "rtll", "rtal"] = "ftal"
    epochs: int = Field(2, ge=1)
    lr: float = Field(0.01, gt=0)
    data_fraction: float = Field(1.0, gt=0, le=1, description="share of the attacker split used")
    label_noise: float = Field(0.0, ge=0, le=1, description="share of labels drawn at random")


def train_on_attacker_data(
    model, ctx, fraction: float, epochs: int, lr: float, label_noise: float = 0.0, **kw
) -> None:
    """Supervised training on a seeded share of the attacker split (never the owner's);
    `label_noise` resamples that share of the labels uniformly (a malicious fine-tune)."""
    split = ctx.data.attacker
    data = split.take(max(1, round(fraction * len(split))), seed=ctx.seed)
    y = data.y
    if label_noise:
        g = torch.Generator().manual_seed(ctx.seed + 1)
        noisy = torch.rand(len(y), generator=g) < label_noise
        y = torch.where(noisy, torch.randint(0, ctx.data.num_classes, (len(y),), generator=g), y)
    fit(model, data.x, y, ctx.train, ctx.device, ctx.seed, epochs=epochs, lr=lr, **kw)


@register("fine_tune")
class FineTune(Attack):
    Params = FineTuneParams

    @classmethod
    def tiny_params(cls) -> dict:
        return {"epochs": 1}

    def apply(self, model, ctx):
        p = self.params
        if p.mode.startswith("rt"):
            model.reset_classifier(ctx.spec.num_classes)
            model.to(ctx.device)
        last_layer = p.mode.endswith("ll")
        params = model.get_classifier().parameters() if last_layer else None
        train_on_attacker_data(
            model,
            ctx,
            p.data_fraction,
            p.epochs,
            p.lr,
            p.label_noise,
            params=params,
            freeze_bn=last_layer,
        )
        return Attacked(model)
