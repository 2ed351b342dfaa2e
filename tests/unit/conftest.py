"""Shared unit-test fixtures (unit tests never start Ray and never reach the network)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything that tries to connect fails loudly: weights and data must ship with the wheels."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def one_thread():
    """On a busy 2-core machine two intra-op threads spin against other work and small
    training steps run ten times slower; one thread keeps such tests fast and stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
