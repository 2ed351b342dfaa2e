"""Integration fixtures: one embedded local Ray for the session and tiny scenarios.

Everything here runs on real Ray (no mocks). Scenarios are tiny on purpose — LeNet on 16x16
digits, one or two epochs — so the whole suite stays within a few minutes on 2 CPU cores.
Tests that need a Ray of their own (the CLI subprocesses, the multi-node `Cluster`) run it in
a separate process and never share this session's instance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from integration_support import tiny_scenario_dict

from harness.config import Scenario, parse_scenario

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """The session's embedded local Ray (2 CPUs, no dashboard); yields its GCS address."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Leave no Ray running for the tests after this folder's: the unit tests check that
    nothing initialised Ray, and `harness.scheduler.connect` would silently reuse it. (The
    session fixture's own shutdown at the end is then a no-op.)"""
    if nextitem is None or not nextitem.path.is_relative_to(HERE):
        ray.shutdown()


@pytest.fixture
def tiny_scenario() -> Callable[..., Scenario]:
    """Factory: `tiny_scenario(attacks=[...], ...)` -> a validated Scenario."""

    def build(**overrides: Any) -> Scenario:
        return parse_scenario(tiny_scenario_dict(**overrides))

    return build
