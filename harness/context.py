"""What a method or attack sees of its cell: data splits, training config, model spec, device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    artifacts: Any = None  # harness.artifacts.ArtifactStore, for methods' and attacks' own files
    marked: dict | None = None  # attack / verify: the embed stage's meta
    evidence: dict | None = None  # verify: what the attack returned beside its model

    @property
    def task(self) -> str:
        return self.data.task

    def create_model(self, spec: ModelSpec | None = None) -> nn.Module:
        from harness.training import prepare

        return prepare(create_model(spec or self.spec), self.device)
