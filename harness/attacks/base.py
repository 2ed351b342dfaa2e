"""The attack interface; `identity` is its do-nothing default.

Lifecycle: ``Params``, ``check_data`` and ``check_arch`` run in the driver at validation, as
for methods. In the worker's ``attack`` stage (once per marked model x attack params) the
engine loads the marked model, seeds every RNG with the cell's seed, hands ``apply`` a context
whose data are the ATTACKER's split only (``ctx.data.attacker``; ``ctx.marked`` is the embed
artifact, for attacks that read what a licensed user holds) and saves the `Attacked` result.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn as nn

from harness.context import Context
from harness.plugin import Attacked, Bars, Metric, Plugin
from harness.registry import Registry


class Attack(Plugin):
    kind = "attack"
    # Methods whose models it targets (ambiguity attacks need passport layers); None: any.
    methods: ClassVar[tuple[str, ...] | None] = None
    # True for extraction attacks: they learn from the deployment's answers (`ctx.query`), so
    # methods that mark answers (DAWN) are judged on what they stole
    queries_api: ClassVar[bool] = False
    # `harness tune` on an attack: maximise removal (WRT's rule) under a task-drop constraint
    objective = "wm_removed"

    @classmethod
    def default_objective(cls) -> str | None:
        return cls.objective

    def check_method(self, method) -> None:
        """Raise a ConfigError (field: this attack's parameter) if these params cannot work
        on the models `method` (a Method plug-in with its params) hands out - e.g. more
        colluders than licensed copies. Called at validation for every method x attack grid
        pair that runs (after `methods`)."""

    def apply(self, model: nn.Module, ctx: Context) -> Attacked:
        """Modify (or replace) the marked model using only the attacker's split."""
        raise NotImplementedError


ATTACKS: Registry[type[Attack]] = Registry("attack", Attack)
register = ATTACKS.register


def create_attack(name: str, params: dict | None = None) -> Attack:
    return ATTACKS.get(name)(params)


__all__ = ["ATTACKS", "Attack", "Attacked", "Bars", "Metric", "create_attack", "register"]
