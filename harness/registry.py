"""A small typed registry: register by name, look up with a close-match hint, list sorted."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from harness.errors import UnknownNameError

T = TypeVar("T")


def close_match(name: str, names: list[str]) -> str | None:
    matches = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return matches[0] if matches else None


class Registry(Generic[T]):
    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind, self.base = kind, base
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise TypeError(f"{self.kind} {name!r} must subclass {self.base.__name__}")
            if isinstance(obj, type):
                obj.name = name
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind}",
                value=name,
                hint=close_match(str(name), self.list()),
                allowed=self.list(),
            ) from None

    def list(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
