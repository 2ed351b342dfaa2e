"""cluster.yaml is a valid Ray cluster-launcher config, checked with Ray's own code.

`prepare_config` merges the file with the defaults.yaml bundled in the Ray wheel
(ray/autoscaler/aws/defaults.yaml) and `validate_config` checks the result against the bundled
ray-schema.json. Neither touches AWS: the EC2 calls (instance types, AMIs, IAM, subnets) happen
later, in the provider's bootstrap step of `ray up`, which these tests never reach. The
`offline` fixture makes any network connection fail, to prove it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"

TORCH_PIN = "torch==2.14.1"
TORCHVISION_PIN = "torchvision==0.29.1"


@pytest.fixture(autouse=True)
def no_aws(offline, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network and no AWS credentials: validating the config must need neither."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")


def load_raw() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        config = yaml.safe_load(f)
    assert isinstance(config, dict)
    return config


@pytest.fixture
def raw() -> dict[str, Any]:
    return load_raw()


@pytest.fixture
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def gpus(node_type: dict[str, Any]) -> float:
    return node_type.get("resources", {}).get("GPU", 0)


def test_validates_against_ray_schema(prepared: dict[str, Any]) -> None:
    # Re-validate explicitly so a failure points here rather than at the fixture.
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"]
    assert prepared["cluster_name"] == "wmbench"
    assert prepared["max_workers"] >= 1
    assert prepared["idle_timeout_minutes"] > 0


def test_prepare_config_does_not_mutate_input(raw: dict[str, Any]) -> None:
    before = copy.deepcopy(raw)
    prepare_config(raw)
    assert raw == before


def test_own_values_survive_merge_with_ray_defaults(
    raw: dict[str, Any], prepared: dict[str, Any]
) -> None:
    # The merge with Ray's defaults.yaml is shallow: any top-level key missing here is taken
    # whole from Ray's example, whose setup_commands install a Ray nightly wheel and whose
    # head_start_ray_commands bind the dashboard to 0.0.0.0. Keep all of them in cluster.yaml.
    unchanged = (
        "max_workers",
        "head_node_type",
        "file_mounts",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    merged = ("available_node_types", "head_setup_commands", "worker_setup_commands")
    for key in unchanged + merged:
        assert key in raw, f"{key} missing: Ray's example default would be used"
    for key in unchanged:
        assert prepared[key] == raw[key], key
    # prepare_config only fills in per-type min/max_workers ...
    for name, node_type in raw["available_node_types"].items():
        got = prepared["available_node_types"][name]
        assert {k: got[k] for k in node_type} == node_type, name
        assert set(got) - set(node_type) <= {"min_workers", "max_workers"}, name
    # ... and puts the common setup_commands in front of the per-role ones.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert prepared[key] == raw["setup_commands"] + raw[key], key
    every_command = " ".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    assert "ray-wheels" not in every_command
    assert "dev0" not in every_command


def test_head_is_cpu_only_and_workers_have_gpus(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head_name = prepared["head_node_type"]
    assert head_name in types
    head = types[head_name]
    assert gpus(head) == 0
    assert head["max_workers"] == 0  # filled in by prepare_config for the head type

    workers = {name: t for name, t in types.items() if name != head_name}
    assert workers, "no worker node type"
    gpu_workers = {name: t for name, t in workers.items() if gpus(t) >= 1}
    assert gpu_workers, "no worker node type declares GPU resources"
    for name, t in gpu_workers.items():
        assert t["min_workers"] == 0, name
        assert 1 <= t["max_workers"] <= prepared["max_workers"], name
        assert t["node_config"]["InstanceType"], name


def test_setup_installs_pinned_torch_then_the_project(prepared: dict[str, Any]) -> None:
    # After prepare_config, setup_commands are prepended to head/worker_setup_commands.
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[key]
        torch_idx = next(
            (i for i, c in enumerate(commands) if TORCH_PIN in c.split()),
            None,
        )
        assert torch_idx is not None, f"{key}: no `pip install {TORCH_PIN}`"
        assert TORCHVISION_PIN in commands[torch_idx].split(), key
        project_idx = next(
            (i for i, c in enumerate(commands) if "pip install -e ~/wmbench" in c),
            None,
        )
        assert project_idx is not None, f"{key}: project is not installed"
        assert torch_idx < project_idx, f"{key}: install the torch pin before the project"

    assert prepared["file_mounts"].get("~/wmbench") == "."


def test_head_dashboard_binds_localhost(prepared: dict[str, Any]) -> None:
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


def test_token_auth_stays_on(prepared: dict[str, Any]) -> None:
    # `ray start` only turns token auth on when told to (or when a token file exists), so
    # both start commands set it and every node gets the token.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(prepared[key])
        assert "RAY_AUTH_MODE=token" in start, key
        assert "RAY_AUTH_MODE=disabled" not in start, key
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(
        prepared["worker_start_ray_commands"]
    )
    assert "~/.ray/auth_token" in prepared["file_mounts"]


def test_misspelled_top_level_key_is_rejected(raw: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw)
    bad["max_worker"] = bad.pop("max_workers")
    # prepare_config does not notice: it silently takes max_workers from Ray's defaults.yaml.
    prepared = prepare_config(bad)
    assert "max_workers" in prepared and "max_worker" in prepared
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepared)


def test_unknown_head_node_type_is_rejected(raw: dict[str, Any]) -> None:
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "no.such.type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))
