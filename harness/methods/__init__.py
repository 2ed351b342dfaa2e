"""Watermark methods: one module each, registered by name; importing the package loads all.

A method module imports what it needs from `harness.methods.base` (never this package)."""

from __future__ import annotations

import importlib
import pkgutil

from harness.methods.base import (
    METHODS,
    Attacked,
    AuxOutput,
    AuxStep,
    Embedded,
    Method,
    Metric,
    NoParams,
    VictimRef,
    WatermarkScore,
    create_method,
    register,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "METHODS", "Attacked", "AuxOutput", "AuxStep", "Embedded", "Method", "Metric", "NoParams",
    "VictimRef", "WatermarkScore", "create_method", "register",
]  # fmt: skip
