"""Stacked attacks (WRT's `stacked_attack`: e.g. weight shifting -> fine-pruning -> smoothing):
a list of attacks applied in order, each run by the engine as its own cached attack stage on
the previous one's model (`Attack.steps`). A stack that starts with `prune` at 0.6 shares that
pruned model with every other stack - and with the plain `prune` cell - that starts the same
way, and each step keeps its own plug-in's defaults, validation and figures.

    {name: stack, params: {attacks: [{name: prune, params: {sparsity: [0.3, 0.6]}},
                                      {name: fine_tune, params: {mode: ftal}}]}}

Parameter lists inside a step expand the grid as usual (here: two stacks). The row carries the
figures of every step (a later step's figure of the same name wins), the served-API queries of
all steps added up, and the earlier steps' seconds (`stage_seconds.attack_prior_steps`).
Every step is checked against the data, each arch and each method it meets at validation: a
step that does not apply (a passport forgery on a Uchida model, an image-to-image attack on
classification data) exits 2 with its field path.
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.attacks.base import ATTACKS, Attack, register
from harness.config import ComponentCfg, resolve_component
from harness.data import task_of
from harness.errors import ConfigError


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="a registered attack (not `stack`)")
    params: dict[str, Any] = Field(default_factory=dict)


class StackParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attacks: list[Step] = Field(
        default_factory=lambda: [Step(name="prune", params={"sparsity": 0.5}),
                                 Step(name="fine_tune", params={"mode": "ftal"})],
        min_length=1, description="the attacks, applied in order (default: prune 50 % -> FTAL)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _steps_are_attacks(self) -> StackParams:
        """Each step's params validated and default-filled by its own plug-in."""
        for i, step in enumerate(self.attacks):
            if step.name == "stack":
                raise ConfigError("a stack cannot nest a stack (list its steps instead)",
                                  field=f"attacks[{i}].name", value=step.name)  # fmt: skip
            points = resolve_component(ComponentCfg(name=step.name, params=step.params),
                                       ATTACKS, f"attacks[{i}]", None)  # fmt: skip
            if len(points) != 1:
                raise ConfigError("a list here expands the grid: write the stack in a scenario",
                                  field=f"attacks[{i}].params", value=step.params)  # fmt: skip
            step.params = points[0]
        return self


@register("stack")
class Stack(Attack):
    Params = StackParams
    # classification: the only task with more than one attack to stack (image-to-image has
    # `surrogate` alone); a step's own `tasks` is checked at validation all the same
    tasks = ("classification",)

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.plugins = [ATTACKS.get(s.name)(s.params) for s in self.params.attacks]
        self.queries_api = any(p.queries_api for p in self.plugins)

    @classmethod
    def tiny_params(cls) -> dict:
        return {"attacks": [{"name": "prune", "params": {"sparsity": 0.3}},
                            {"name": "fine_tune", "params": {"epochs": 1}}]}  # fmt: skip

    @classmethod
    def grid(cls, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The product over the steps' own grids (validation explains malformed steps)."""
        steps = params.get("attacks")
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            return [params]
        axes = []
        for i, step in enumerate(steps):
            name, own = step.get("name"), step.get("params") or {}
            if name not in ATTACKS or name == "stack" or not isinstance(own, dict):
                axes.append([step])
                continue
            try:
                points = ATTACKS.get(name).grid(own)
            except ConfigError as e:
                raise e.with_location(None, f"attacks[{i}].params") from None
            axes.append([{**step, "params": p} for p in points])
        return [{**params, "attacks": list(combo)} for combo in itertools.product(*axes)]

    @classmethod
    def grid_count(cls, params: dict[str, Any]) -> int:
        try:
            return len(cls.grid(params))
        except ConfigError:
            return 1  # the grid-size guard counts; validation reports the error

    def _each(self, check) -> None:
        for i, plugin in enumerate(self.plugins):
            try:
                check(i, plugin)
            except ConfigError as e:
                raise e.with_location(None, f"attacks[{i}].params") from None

    def check_data(self, dataset) -> None:
        task = task_of(dataset.name)
        for i, plugin in enumerate(self.plugins):
            if task not in plugin.tasks:
                raise ConfigError(f"attack {plugin.name!r} does not apply to {task} data",
                                  field=f"attacks[{i}].name", value=plugin.name,
                                  allowed=_steps_where(lambda c: task in c.tasks))  # fmt: skip
        self._each(lambda i, plugin: plugin.check_data(dataset))

    def check_arch(self, arch: str, dataset) -> None:
        self._each(lambda i, plugin: plugin.check_arch(arch, dataset))

    def check_method(self, method) -> None:
        for i, plugin in enumerate(self.plugins):
            if plugin.methods is not None and method.name not in plugin.methods:
                raise ConfigError(
                    f"attack {plugin.name!r} applies to {list(plugin.methods)} only, and this "
                    f"grid pairs the stack with {method.name!r}",
                    field=f"attacks[{i}].name", value=plugin.name,
                    allowed=_steps_where(lambda c: c.methods is None or method.name in c.methods),
                )  # fmt: skip
        self._each(lambda i, plugin: plugin.check_method(method))

    def steps(self) -> list[tuple[str, dict[str, Any]]]:
        return [(s.name, s.params) for s in self.params.attacks]

    def apply(self, model, ctx):
        raise RuntimeError("the engine runs a stack's steps as their own stages (Attack.steps)")


def _steps_where(keep) -> list[str]:
    """The attacks a stack may list that pass `keep(attack class)` (for refusals)."""
    return [n for n in ATTACKS.list() if n != "stack" and keep(ATTACKS.get(n))]
