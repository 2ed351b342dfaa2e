"""What a method or attack sees of its cell: data splits, training config, model spec, device,
and the artifacts the engine loaded for it (its aux steps' outputs, the marked model's)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from harness.artifacts import Artifact
from harness.config import TrainCfg
from harness.data import Splits
from harness.serving import API
from harness.training import predict_logits, prepare
from model_zoo import ModelSpec, create_model


@dataclass
class Context:
    data: Splits
    train: TrainCfg
    spec: ModelSpec
    device: str
    seed: int
    # embed and aux steps: the seed of every secret (keys, trigger sets, passports), derived
    # from the store's owner secret and the stage key - never from a field printed in rows
    owner_seed: int = 0
    inputs: dict[str, Artifact] = field(default_factory=dict)  # declared needs, by name
    marked: Artifact | None = None  # attack / verify: the embed artifact (its inputs too)
    evidence: dict | None = None  # verify: what the attack returned beside its model
    # attack: the marked model as served (`query`); verify: the watermarked answers that
    # deployment gave this cell's attacker, as its owner logged them (`harness.serving`)
    api: API | None = None
    api_log: dict | None = None

    @property
    def task(self) -> str:
        return self.data.task

    def query(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The answers an attacker gets for queries `x` to the marked `model`: through the
        owner's served API in an attack stage (a method like DAWN alters some of them; the
        engine counts the queries and logs the altered answers), else `model`'s own logits."""
        if self.api is not None:
            return self.api(x)
        return predict_logits(model, x, self.device)

    def create_model(self, spec: ModelSpec | None = None) -> nn.Module:
        return prepare(create_model(spec or self.spec), self.device)
