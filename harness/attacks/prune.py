"""Global unstructured pruning of every conv / linear weight (L1 or random), then optional
fine-tuning on the attacker split (fine-pruning)."""

from __future__ import annotations

from typing import Literal

import torch.nn as nn
import torch.nn.utils.prune as tprune
from pydantic import BaseModel, ConfigDict, Field

from harness.attacks.base import Attack, Attacked, register
from harness.attacks.fine_tune import train_on_attacker_data


class PruneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sparsity: float = Field(0.5, ge=0, le=1, description="share of weights set to zero")
    method: Literal["l1", "random"] = "l1"
    fine_tune_epochs: int = Field(0, ge=0)
    lr: float = Field(0.01, gt=0)
    data_fraction: float = Field(1.0, gt=0, le=1)


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def global_prune(model: nn.Module, sparsity: float, method: str = "l1") -> None:
    targets = prunable(model)
    method_cls = tprune.L1Unstructured if method == "l1" else tprune.RandomUnstructured
    tprune.global_unstructured(targets, pruning_method=method_cls, amount=sparsity)
    for module, name in targets:
        tprune.remove(module, name)


@register("prune")
class Prune(Attack):
    Params = PruneParams

    def apply(self, model, ctx):
        p = self.params
        global_prune(model, p.sparsity, p.method)
        if p.fine_tune_epochs:
            masks = [(m.weight == 0) for m, _ in prunable(model)]
            train_on_attacker_data(model, ctx, p.data_fraction, p.fine_tune_epochs, p.lr)
            for (module, _), mask in zip(prunable(model), masks, strict=True):
                module.weight.data[mask] = 0.0
        return Attacked(model)
