"""Attacks: one module each, registered by name; importing the package loads all."""

from __future__ import annotations

import importlib
import pkgutil

from harness.attacks.base import Attack
from harness.registry import Registry

ATTACKS: Registry[type[Attack]] = Registry("attack", Attack)
register = ATTACKS.register


def create_attack(name: str, params: dict | None = None) -> Attack:
    return ATTACKS.get(name)(params)


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ATTACKS", "Attack", "create_attack", "register"]
