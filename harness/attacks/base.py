"""The attack interface; `identity` is its do-nothing default."""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn as nn
from pydantic import BaseModel

from harness.context import Context
from harness.methods.base import NoParams
from model_zoo import ModelSpec


class Attack:
    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Params: ClassVar[type[BaseModel]] = NoParams
    tasks: ClassVar[tuple[str, ...]] = ("classification",)  # models it applies to
    # Methods whose models it targets (ambiguity attacks need passport layers); None: any.
    methods: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = self.Params(**(params or {}))

    def check_data(self, dataset) -> None:
        """Raise a ConfigError (field: the parameter's name) if these params cannot work on
        `dataset` (a DatasetCfg); runs at validation, before any task starts."""

    def check_arch(self, arch: str, dataset) -> None:
        """As `check_data`, for each arch of the scenario (the victim the attack receives)."""

    def apply(
        self, model: nn.Module, ctx: Context
    ) -> tuple[nn.Module, ModelSpec] | tuple[nn.Module, ModelSpec, dict[str, Any]]:
        """Modify (or replace) the marked model using only the attacker's split.

        A third element, if returned, is the attack's evidence (forged passports, keys): saved
        with its artifacts (never in a row) and handed to the method's `verify` as
        `ctx.evidence`. `ctx.marked` is the embed stage's meta: public artifacts a method
        publishes (e.g. an ISN that licences are checked with) are reachable through it."""
        raise NotImplementedError
