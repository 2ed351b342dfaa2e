"""Watermark methods: one module each, registered by name; importing the package loads all."""

from __future__ import annotations

import importlib
import pkgutil

from harness.methods.base import Method, NoParams, WatermarkScore
from harness.registry import Registry

METHODS: Registry[type[Method]] = Registry("method", Method)
register = METHODS.register


def create_method(name: str, params: dict | None = None) -> Method:
    return METHODS.get(name)(params)


for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "Method", "NoParams", "WatermarkScore", "create_method", "register"]
