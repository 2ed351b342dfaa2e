"""The watermark-method interface; `none` is its do-nothing default.

Lifecycle of one cell, and what the engine does around each hook (after Optuna's
``BaseSampler`` docstrings):

1. Driver, at validation: ``Params`` validates each grid point (defaults filled in; they are
   part of the keys); ``check_data`` and ``check_arch`` refuse what the method cannot take.
2. Driver, building the stage DAG: ``aux_steps()`` and ``needs()`` are read per cell; the engine
   keys every aux step and victim and submits each distinct key once.
3. Worker, ``embed`` stage (once per victim x params): the engine loads the victim and each
   need (``ctx.inputs[name]``), seeds every RNG with the cell's seed, calls ``embed``, then
   ``verify`` on the marked model, measures its task score and saves model and secret.
4. Worker, ``verify`` stage (once per cell): the engine loads the attacked model, the secret
   and ``ctx.inputs`` (as ``embed`` saw them) and, if the attack left any, ``ctx.evidence``;
   ``verify`` returns a `WatermarkScore`. The engine writes the row, with the task scores,
   the marked model's figures (suffix ``_marked``) and WRT's removal rule.

Any exception in a hook becomes a failed row with its traceback; ``TransientError`` (storage
I/O) is retried by Ray instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from harness.context import Context
from harness.plugin import (
    Attacked,
    AuxOutput,
    AuxStep,
    Bars,
    Embedded,
    Metric,
    Need,
    NoParams,
    Plugin,
    VictimRef,
    WatermarkScore,
)
from harness.registry import Registry


class Method(Plugin):
    kind = "method"
    # The figure `verify` returns as its score (None: nothing to verify, the control).
    wm_metric: ClassVar[str | None] = None
    # False for non-intrusive methods (keys verify an unchanged model), where "an unmarked
    # model is not detected" does not apply: the unmarked model *is* the protected one.
    marks_weights: ClassVar[bool] = True
    # True for methods that mark the deployment's answers (DAWN): every answer of the marked
    # model, to an attacker's queries or to `verify` of the deployment itself, passes `serve`
    serves: ClassVar[bool] = False
    # Parameters only `verify` reads (a defence applied at verification, e.g. aligning the
    # suspect's neurons): they stay out of the embed and attack keys, so both settings share
    # one marked and one attacked model, and enter the cell id when set off their defaults.
    verify_params: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def default_objective(cls) -> str | None:
        """What `harness tune` maximises unless told: the plug-in's `objective`, else the
        watermark score after the scenario's attacks."""
        return cls.objective or cls.wm_metric

    def needs(self) -> tuple[Need, ...]:
        """What ``embed`` reads besides its victim, as ``ctx.inputs[name]``: aux steps (by
        name) and other victims (`VictimRef`: null models). Default: every aux step."""
        return tuple(step.name for step in self.aux_steps())

    def embed(self, victim: nn.Module, ctx: Context) -> Embedded:
        """Mark `victim` (trained on the owner's split; yours to change in place) and return
        it with the secret. Called once per (victim, params) and shared by every attack."""
        raise NotImplementedError

    def serve(
        self, x: torch.Tensor, logits: torch.Tensor, secret: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``serves`` methods) The answers the owner's API gives to queries `x` (float in
        [0, 1]) whose logits are `logits`, and the bool mask of the answers it altered."""
        raise NotImplementedError

    def verify(self, model: nn.Module, secret: dict[str, Any], ctx: Context) -> WatermarkScore:
        """Score a suspect model: the marked one (right after ``embed``) or an attacked one.
        Must not modify `model` for good (restore anything it sets). For ``serves`` methods,
        the deployment itself (the marked model, or an attack that left it unchanged) arrives
        behind ``serve``, and a copy trained on the API's answers comes with ``ctx.api_log``."""
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method", Method)
register = METHODS.register


def create_method(name: str, params: dict | None = None) -> Method:
    return METHODS.get(name)(params)


__all__ = [
    "METHODS", "Attacked", "AuxOutput", "AuxStep", "Bars", "Embedded", "Method", "Metric",
    "NoParams", "VictimRef", "WatermarkScore", "create_method", "register",
]  # fmt: skip
