"""The attack interface; `identity` is its do-nothing default.

Lifecycle: ``Params``, ``check_data`` and ``check_arch`` run in the driver at validation, as
for methods. In the worker's ``attack`` stage (once per marked model x attack params) the
engine loads the marked model, seeds every RNG with the cell's seed, hands ``apply`` a context
whose data are the ATTACKER's split only (``ctx.data.attacker``; ``ctx.marked`` is the embed
artifact, for attacks that read what a licensed user holds) and saves the `Attacked` result.

An attack on the deployment's *inputs* (JPEG, smoothing, an autoencoder in front of the
model) subclasses `InputAttack` and writes only `transform`: the weights stay as they are and
every image the model is asked about - by the task score, by a method's verify, by the served
API - passes the transform first. The engine records it in the model's spec (wrapper
`input_transform`), so the stored model is rebuilt with it; parts the attacker trains (an
autoencoder) are `transform_modules`, stored with the model's weights.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from harness.context import Context
from harness.plugin import Attacked, Bars, Metric, Plugin
from harness.registry import Registry
from model_zoo import WRAPPERS, ModelSpec


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

    def steps(self) -> list[tuple[str, dict[str, Any]]] | None:
        """For an attack made of other attacks run in order (`stack`): their (name, validated
        params), each run by the engine as its own cached attack stage on the previous one's
        model - so a stack's first step is the same stage as that attack alone. None (the
        default): this attack's own `apply` is the one stage."""
        return None


ATTACKS: Registry[type[Attack]] = Registry("attack", Attack)
register = ATTACKS.register


def create_attack(name: str, params: dict | None = None) -> Attack:
    return ATTACKS.get(name)(params)


class InputAttack(Attack):
    """An input-preprocessing attack (see the module docstring): `transform` is all a plug-in
    must write; `transform_modules` and `fit` add parts the attacker trains."""

    def transform(self, x: torch.Tensor, modules: nn.Module | None) -> torch.Tensor:
        """What the deployment feeds the model instead of `x` (float images in [0, 1], N x C x
        H x W, on the model's device; the same shape back). `modules`: `transform_modules`'s
        result, trained by `fit` (None if the attack has none). Called under no_grad."""
        raise NotImplementedError

    def transform_modules(self, spec: ModelSpec) -> nn.Module | None:
        """Fresh trainable parts of the transform for a model of `spec` (None: none)."""
        return None

    def fit(self, modules: nn.Module, model: nn.Module, ctx: Context) -> dict[str, float]:
        """Train `modules` on the attacker's split (`model`: the marked model, untouched);
        returns figures for the row (declared in `metrics`)."""
        return {}

    def apply(self, model: nn.Module, ctx: Context) -> Attacked:
        modules = self.transform_modules(ctx.spec)
        figures: dict[str, float] = {}
        if modules is not None:
            modules = modules.to(ctx.device)
            figures = self.fit(modules, model, ctx)
        install_transform(model, self, modules)
        spec = ctx.spec.replace(
            wrapper="input_transform",
            wrapper_params={
                "attack": self.name,
                "params": self.params.model_dump(mode="json"),
                "base": {"wrapper": ctx.spec.wrapper, "wrapper_params": ctx.spec.wrapper_params},
            },
        )
        return Attacked(model, spec, metrics=figures)


TRANSFORM_PREFIX = "input_transform"  # where trained transform parts sit in the state dict


def install_transform(model: nn.Module, attack: InputAttack, modules: nn.Module | None) -> None:
    """Make `model` apply `attack.transform` to every input (a forward pre-hook; the weights
    and their names are untouched). Transforms installed earlier run first."""
    depth = sum(1 for name, _ in model.named_children() if name.startswith(TRANSFORM_PREFIX))
    if modules is not None:
        model.add_module(f"{TRANSFORM_PREFIX}{depth}", modules)

    def hook(_module: nn.Module, args: tuple) -> tuple:
        if not args or not isinstance(args[0], torch.Tensor):
            return args
        with torch.no_grad():
            x = attack.transform(args[0], modules)
        return (x.to(args[0].dtype), *args[1:])

    model.register_forward_pre_hook(hook)


def input_transform_wrapper(
    model: nn.Module, spec: ModelSpec, attack: str, params: dict[str, Any], base: dict
) -> nn.Module:
    """The `input_transform` ModelSpec wrapper: the model's own wrapper (`base`) first, then
    the attack's transform, with fresh trainable parts the stored state dict then fills."""
    if base.get("wrapper") is not None:
        model = WRAPPERS.get(base["wrapper"])(model, spec, **(base.get("wrapper_params") or {}))
    plugin = create_attack(attack, params)
    if not isinstance(plugin, InputAttack):
        raise TypeError(f"attack {attack!r} is not an input transform")
    install_transform(model, plugin, plugin.transform_modules(spec))
    return model


WRAPPERS.register("input_transform")(input_transform_wrapper)


__all__ = [
    "ATTACKS", "Attack", "Attacked", "Bars", "InputAttack", "Metric", "create_attack",
    "register",
]  # fmt: skip
