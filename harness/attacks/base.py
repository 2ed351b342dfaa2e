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

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = self.Params(**(params or {}))

    def apply(self, model: nn.Module, ctx: Context) -> tuple[nn.Module, ModelSpec]:
        """Modify (or replace) the marked model using only the attacker's split."""
        raise NotImplementedError
