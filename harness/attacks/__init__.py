"""Attacks: one module each, registered by name; importing the package loads all.

An attack module imports what it needs from `harness.attacks.base` (never this package)."""

from __future__ import annotations

import importlib
import pkgutil

from harness.attacks.base import ATTACKS, Attack, Attacked, Metric, create_attack, register

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ATTACKS", "Attack", "Attacked", "Metric", "create_attack", "register"]
