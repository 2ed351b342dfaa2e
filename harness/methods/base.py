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
    # False for non-intrusive methods (keys verify an unchanged model), where "an unmarked
    # model is not detected" does not apply: the unmarked model *is* the protected one.
    marks_weights: ClassVar[bool] = True
    # The kind of model it protects: "classification" (labels) or "image2image" (image pairs).
    tasks: ClassVar[tuple[str, ...]] = ("classification",)

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = self.Params(**(params or {}))

    def check_data(self, dataset) -> None:
        """Raise a ConfigError (field: the parameter's name) if these params cannot work on
        `dataset` (a DatasetCfg); runs at validation, before any task starts."""

    def check_arch(self, arch: str, dataset) -> None:
        """Raise a ConfigError (field: the parameter's name) if these params cannot work on
        `arch` with `dataset` (e.g. passport layers on a stage without BatchNorm); runs at
        validation for every arch of the scenario, before any task starts."""

    def aux_jobs(self, cell) -> list:
        """Extra upstream stages the embedding needs (null models, key generation, ...).

        Each is a `harness.cells.Job`; `train_victim` jobs are ordinary victims, `aux/<step>`
        jobs run `run_aux(step, ...)`. Their metas reach `embed` as `deps`, in this order."""
        return []

    def run_aux(self, step: str, cell, ctx: Context, artifacts, key: str, deps: list[dict]) -> dict:
        raise NotImplementedError(f"{self.name} declares no aux step {step!r}")

    def embed(
        self, victim: nn.Module, ctx: Context, deps: list[dict], artifacts
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Return the marked model and the secret key material (saved under artifacts/ only)."""
        raise NotImplementedError

    def verify(self, model: nn.Module, key: dict[str, Any], ctx: Context) -> WatermarkScore:
        raise NotImplementedError
