"""What a method or attack sees of its cell: data splits, training config, model spec, device."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from harness.data import Splits
from model_zoo import ModelSpec, create_model


@dataclass
class Context:
    data: Splits
    train: object  # harness.config.TrainCfg
    spec: ModelSpec
    device: str
    seed: int

    def create_model(self, spec: ModelSpec | None = None) -> nn.Module:
        from harness.training import prepare

        return prepare(create_model(spec or self.spec), self.device)
