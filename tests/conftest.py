"""Fixtures for every test folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import harness.artifacts

TEST_OWNER_SECRET = "5eed" * 16  # 32 bytes


@pytest.fixture(autouse=True, scope="session")
def fixed_owner_secret() -> Iterator[None]:
    """Stores made by a test get one fixed owner secret, so keys, trigger sets and passports
    (and every figure that depends on them) are the same on every run of the suite. Session
    scope: module- and session-scoped store fixtures get it too. Stores made by a `harness`
    subprocess still get a random one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness.artifacts, "new_owner_secret", lambda: TEST_OWNER_SECRET)
        yield
