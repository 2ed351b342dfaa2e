"""The watermark-method interface; `none` is its do-nothing default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from harness.context import Context


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class WatermarkScore:
    """A verification outcome; `score` is None for methods with nothing to verify."""

    score: float | None
    detected: bool
    threshold: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Method:
    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Params: ClassVar[type[BaseModel]] = NoParams
    wm_metric: ClassVar[str | None] = None

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = self.Params(**(params or {}))

    def null_seeds(self, seed: int) -> list[int]:
        """Seeds of unmarked victims this method calibrates its threshold on."""
        return []

    def embed(
        self, victim: nn.Module, ctx: Context, null_models: list[nn.Module]
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Return the marked model and the secret key material (saved under artifacts/ only)."""
        raise NotImplementedError

    def verify(self, model: nn.Module, key: dict[str, Any], ctx: Context) -> WatermarkScore:
        raise NotImplementedError
