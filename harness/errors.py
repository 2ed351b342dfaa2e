"""Exception hierarchy.

Retryable failures (``TransientError``) are kept apart from deterministic ones: only a
``TransientError`` leaves a stage task for Ray to retry; everything else that goes wrong
inside a cell becomes a ``status="failed"`` row instead of a crash.
"""

from __future__ import annotations

from typing import Any

_UNSET = object()


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""

    exit_code = 1


class ConfigError(HarnessError, ValueError):
    """Bad user input: names the file, the field path, the value and what is allowed."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        field: str | None = None,
        value: Any = _UNSET,
        allowed: Any = None,
        hint: str | None = None,
    ) -> None:
        self.message, self.file, self.field = message, file, field
        self.value, self.allowed, self.hint = value, allowed, hint
        super().__init__(str(self))

    def with_location(self, file: str | None = None, prefix: str | None = None) -> ConfigError:
        """Return a copy placed in `file` under the field path `prefix`."""
        field = ".".join(p for p in (prefix, self.field) if p) or None
        return type(self)(
            self.message,
            file=file or self.file,
            field=field,
            value=self.value,
            allowed=self.allowed,
            hint=self.hint,
        )

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.field) if p)
        text = f"{where}: {self.message}" if where else self.message
        if self.value is not _UNSET:
            text += f" (got {self.value!r})"
        if self.hint:
            text += f". Did you mean {self.hint!r}?"
        if self.allowed is not None:
            allowed = self.allowed
            if isinstance(allowed, (list, tuple)):
                allowed = ", ".join(map(str, allowed[:40])) + (" ..." if len(allowed) > 40 else "")
            text += f" Allowed: {allowed}."
        return text


class UnknownNameError(ConfigError):
    """A name that no registry knows."""


class TransientError(HarnessError):
    """Storage or network hiccup: Ray retries the task."""


class CorruptFile(HarnessError):
    """A stored file that cannot be read back or whose content hash does not match its meta
    (truncated, altered): its path is in the message; `harness check --repair` removes it."""


class CellFailed(HarnessError):
    """A deterministic failure inside a cell (NaN loss, bad parameter): recorded, not retried."""
