"""Trigger-set watermark (Adi et al., USENIX Security 2018), WRT-style calibrated threshold.

The owner fine-tunes its model on its own data plus a small set of out-of-distribution key
images with random labels. Verification is the model's accuracy on those keys, compared with
a threshold fitted on null models (victims of other seeds that never saw the keys): a
Gaussian on their key accuracy, one-sided at `p_value` (WRT).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from harness.decision import binomial_p, null_figures, null_model_metrics, null_threshold
from harness.methods.base import Embedded, Method, VictimRef, WatermarkScore, register
from harness.training import fit, predict_logits


class TriggerSetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_keys: int = Field(100, ge=1, le=10_000)
    pattern: Literal["abstract", "noise"] = "abstract"
    epochs: int | None = Field(None, ge=1, description="embedding epochs (default: train.epochs)")
    lr: float | None = Field(None, gt=0, description="embedding lr (default: train.lr)")
    key_share: float = Field(0.1, gt=0, lt=1, description="share of keys in the embedding data")
    n_null: int = Field(3, ge=2, le=50)
    p_value: float = Field(0.05, gt=0, lt=0.5)


def make_triggers(n: int, channels: int, size: int, num_classes: int, pattern: str, seed: int):
    """Key images (uint8) and their random labels, from the owner's secret seed."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "noise":
        x = torch.rand(n, channels, size, size, generator=g)
    else:
        low = torch.rand(n, channels, max(2, size // 8), max(2, size // 8), generator=g)
        x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
        x = x + 0.1 * torch.rand(n, channels, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def trigger_accuracy(model, key: dict, device) -> float:
    return (predict_logits(model, key["x"], device).argmax(1) == key["y"]).float().mean().item()


@register("trigger_set")
class TriggerSet(Method):
    Params = TriggerSetParams
    wm_metric = "trigger_acc"
    version = "2"  # 2: the trigger set derives from the store's owner secret, not the seed
    metrics = null_model_metrics("trigger accuracy")

    @classmethod
    def tiny_params(cls) -> dict:
        return {"n_keys": 20, "n_null": 2, "epochs": 6}

    def needs(self):
        """Null models: plain victims of the next `n_null` seeds (shared with those cells)."""
        return tuple(VictimRef(f"null{i}", seed_offset=1 + i) for i in range(self.params.n_null))

    def embed(self, victim, ctx) -> Embedded:
        null_models = [ctx.inputs[f"null{i}"].model() for i in range(self.params.n_null)]
        p, d = self.params, ctx.data
        x, y = make_triggers(
            p.n_keys, d.channels, d.image_size, d.num_classes, p.pattern, ctx.owner_seed
        )
        repeat = max(1, round(p.key_share * len(d.owner) / ((1 - p.key_share) * p.n_keys)))
        train_x = torch.cat([d.owner.x, x.repeat(repeat, 1, 1, 1)])
        train_y = torch.cat([d.owner.y, y.repeat(repeat)])
        fit(victim, train_x, train_y, ctx.train, ctx.device, ctx.seed, epochs=p.epochs, lr=p.lr)
        key = {"x": x, "y": y}
        key.update(self._calibrate(key, null_models, ctx))
        return Embedded(victim, key)

    def _calibrate(self, key: dict, null_models, ctx) -> dict[str, float]:
        accs = [trigger_accuracy(m, key, ctx.device) for m in null_models]
        chance = 1.0 / ctx.data.num_classes
        return null_threshold(accs, chance, self.params.n_keys, self.params.p_value)

    def verify(self, model, key, ctx) -> WatermarkScore:
        acc = trigger_accuracy(model, key, ctx.device)
        return WatermarkScore(
            score=acc,
            detected=acc >= key["threshold"],
            threshold=key["threshold"],
            metrics={
                **null_figures(key),
                "p_value": binomial_p(acc, len(key["y"]), 1.0 / ctx.data.num_classes),
            },
        )
