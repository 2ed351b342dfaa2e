"""Fixtures for every test folder."""

from __future__ import annotations

import pytest

import harness.artifacts

TEST_OWNER_SECRET = "5eed" * 16  # 32 bytes


@pytest.fixture(autouse=True)
def fixed_owner_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores made by a test get one fixed owner secret, so keys, trigger sets and passports
    (and every figure that depends on them) are the same on every run of the suite. Stores
    made by a `harness` subprocess still get a random one."""
    monkeypatch.setattr(harness.artifacts, "new_owner_secret", lambda: TEST_OWNER_SECRET)
    harness.artifacts._OWNER_SECRETS.clear()
