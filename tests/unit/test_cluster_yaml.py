"""cluster.yaml is a valid Ray cluster-launcher config, checked with Ray's own code.

`prepare_config` merges the file with the defaults.yaml bundled in the Ray wheel
(ray/autoscaler/aws/defaults.yaml) and `validate_config` checks the result against the bundled
ray-schema.json. Neither touches AWS: the EC2 calls (instance types, AMIs, IAM, subnets) happen
later, in the provider's bootstrap step of `ray up`, which these tests never reach. The
`offline` fixture makes any network connection fail, to prove it.

The least-privilege tests below read the same file: every node uses the user's own instance
profile (never Ray's `ray-autoscaler-v1`, which carries AmazonEC2FullAccess and
AmazonS3FullAccess) and the user's own security group (never one Ray fills in itself, which
always lets SSH in from 0.0.0.0/0), and the IAM policies and ingress commands documented in the
header comment are parsed and checked too. Each checker returns a list of problems, and each is
shown to catch a broken copy of the config.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.aws.config import (
    _configure_iam_role,
    _configure_security_group,
    _create_default_inbound_rules,
)
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


# --- least privilege: IAM instance profiles ------------------------------------------------------

PROFILE_ARN = re.compile(r"^arn:aws:iam::(?:<ACCOUNT_ID>|\d{12}):instance-profile/([\w+=,.@-]+)$")
# Ray's default profile/role (created with EC2FullAccess + S3FullAccess) and AWS-managed
# *FullAccess policies must not appear anywhere in a node_config.
BANNED_IAM = ("ray-autoscaler-v1", "FullAccess")


def iam_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    profiles = {}
    for name, node_type in config["available_node_types"].items():
        node_config = node_type.get("node_config", {})
        text = json.dumps(node_config)
        problems += [f"{name}: node_config mentions {b}" for b in BANNED_IAM if b in text]
        profile = node_config.get("IamInstanceProfile")
        if not isinstance(profile, dict) or set(profile) != {"Arn"}:
            problems.append(f"{name}: IamInstanceProfile must be {{Arn: <your profile>}}")
            continue
        match = PROFILE_ARN.match(str(profile["Arn"]))
        if match is None:
            problems.append(f"{name}: not an instance-profile ARN: {profile['Arn']}")
            continue
        profiles[name] = match.group(1)
    head = profiles.get(config["head_node_type"])
    for name, profile in profiles.items():
        if name != config["head_node_type"] and profile == head:
            problems.append(f"{name}: shares the head's profile (and its EC2 permissions)")
    return problems


def test_nodes_use_own_scoped_instance_profiles(raw: dict[str, Any]) -> None:
    assert iam_problems(raw) == []
    assert iam_problems(prepare_config(copy.deepcopy(raw))) == []


def _worker(config: dict[str, Any]) -> dict[str, Any]:
    (name,) = [n for n in config["available_node_types"] if n != config["head_node_type"]]
    return config["available_node_types"][name]["node_config"]


def _head(config: dict[str, Any]) -> dict[str, Any]:
    return config["available_node_types"][config["head_node_type"]]["node_config"]


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: _worker(c).update(IamInstanceProfile={"Name": "ray-autoscaler-v1"}),
        lambda c: _worker(c).update(
            IamInstanceProfile={
                "Arn": "arn:aws:iam::123456789012:instance-profile/ray-autoscaler-v1"
            }
        ),
        lambda c: _head(c).update(
            IamInstanceProfile={
                "Arn": "arn:aws:iam::123456789012:instance-profile/AmazonEC2FullAccess"
            }
        ),
        lambda c: _worker(c).update(
            IamInstanceProfile={"Arn": "arn:aws:iam::aws:policy/AmazonS3FullAccess"}
        ),
        lambda c: _worker(c).pop("IamInstanceProfile"),
        lambda c: _worker(c).update(IamInstanceProfile=dict(_head(c)["IamInstanceProfile"])),
    ],
    ids=[
        "worker-default-name",
        "worker-default-arn",
        "head-fullaccess",
        "managed-policy",
        "no-profile",
        "worker-uses-head-profile",
    ],
)
def test_iam_checker_catches(raw: dict[str, Any], break_it) -> None:
    bad = copy.deepcopy(raw)
    break_it(bad)
    assert iam_problems(bad)


def test_ray_creates_no_default_role(prepared: dict[str, Any]) -> None:
    # Ray's own bootstrap step: with a head profile configured it returns without calling AWS
    # (no network here) and never creates or attaches `ray-autoscaler-v1`.
    config = copy.deepcopy(prepared)
    config["head_node"] = {}
    out = _configure_iam_role(config)
    assert out["head_node"] == {}
    assert _head(out)["IamInstanceProfile"] == _head(prepared)["IamInstanceProfile"]


# --- least privilege: network ingress ------------------------------------------------------------


def _ip_permissions(obj: Any):
    """Every rule of every IpPermissions list anywhere in the config."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "IpPermissions":
                yield from value
            else:
                yield from _ip_permissions(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _ip_permissions(value)


def _is_world(cidr: str) -> bool:
    try:
        return ipaddress.ip_network(cidr.strip(), strict=False).prefixlen == 0
    except ValueError:
        return True  # not a CIDR at all: refuse rather than guess


def ingress_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    groups = set()
    for name, node_type in config["available_node_types"].items():
        ids = node_type.get("node_config", {}).get("SecurityGroupIds")
        if not ids:
            problems.append(
                f"{name}: no SecurityGroupIds, so Ray fills a group itself and "
                "lets SSH in from 0.0.0.0/0"
            )
        groups.add(tuple(ids or ()))
    if len(groups) > 1:
        problems.append("the head and the workers are not in the same security group")
    for rule in _ip_permissions(config):
        cidrs = [r.get("CidrIp", "") for r in rule.get("IpRanges", [])]
        cidrs += [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges", [])]
        if not cidrs:
            continue  # group-to-group rule: cluster-internal traffic
        problems += [f"{rule}: open to {c}" for c in cidrs if _is_world(c)]
        port = (str(rule.get("IpProtocol")), rule.get("FromPort"), rule.get("ToPort"))
        if port not in {("tcp", 22, 22), ("6", 22, 22)}:
            problems.append(f"{rule}: only SSH (tcp 22) may be open to an IP range")
    return problems


def test_ssh_only_from_own_cidr_and_nothing_open(raw: dict[str, Any]) -> None:
    assert ingress_problems(raw) == []
    assert ingress_problems(prepare_config(copy.deepcopy(raw))) == []


def _sg_rule(port: int, cidr: str) -> dict[str, Any]:
    key, field = ("Ipv6Ranges", "CidrIpv6") if ":" in cidr else ("IpRanges", "CidrIp")
    return {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, key: [{field: cidr}]}


def _add_rule(config: dict[str, Any], rule: dict[str, Any]) -> None:
    group = config["provider"].setdefault("security_group", {"GroupName": "wmbench-ray"})
    group.setdefault("IpPermissions", []).append(rule)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: _add_rule(c, _sg_rule(22, "0.0.0.0/0")),
        lambda c: _add_rule(c, _sg_rule(22, "::/0")),
        lambda c: _add_rule(c, _sg_rule(8265, "203.0.113.7/32")),
        lambda c: _add_rule(c, _sg_rule(6379, "10.0.0.0/8")),
        lambda c: _add_rule(c, _sg_rule(10001, "0.0.0.0/0")),
        lambda c: _add_rule(
            c,
            {
                "IpProtocol": "-1",
                "FromPort": -1,
                "ToPort": -1,
                "IpRanges": [{"CidrIp": "203.0.113.7/32"}],
            },
        ),
        lambda c: _worker(c).pop("SecurityGroupIds"),
        lambda c: _worker(c).update(SecurityGroupIds=["sg-0123456789abcdef0"]),
    ],
    ids=[
        "ssh-world-v4",
        "ssh-world-v6",
        "dashboard-from-ip",
        "gcs-from-range",
        "client-world",
        "all-ports-from-ip",
        "worker-no-group",
        "worker-other-group",
    ],
)
def test_ingress_checker_catches(raw: dict[str, Any], break_it) -> None:
    bad = copy.deepcopy(raw)
    break_it(bad)
    assert ingress_problems(bad)


def test_ingress_checker_allows_ssh_from_one_address(raw: dict[str, Any]) -> None:
    ok = copy.deepcopy(raw)
    _add_rule(ok, _sg_rule(22, "203.0.113.7/32"))
    assert ingress_problems(ok) == []
    validate_config(prepare_config(ok))  # the schema accepts provider.security_group


def test_ray_leaves_the_security_group_alone(prepared: dict[str, Any]) -> None:
    # Ray's own bootstrap step returns without calling AWS (no network here): every node type
    # names the user's group, so Ray neither creates a group nor adds rules to one.
    out = _configure_security_group(copy.deepcopy(prepared))
    for name, node_type in out["available_node_types"].items():
        want = prepared["available_node_types"][name]["node_config"]["SecurityGroupIds"]
        assert node_type["node_config"]["SecurityGroupIds"] == want, name


def test_why_ray_must_not_fill_the_group() -> None:
    # The reason for SecurityGroupIds: whenever Ray fills a group it adds SSH from 0.0.0.0/0
    # before the IpPermissions of provider.security_group, so those cannot narrow SSH.
    mine = _sg_rule(22, "203.0.113.7/32")
    rules = _create_default_inbound_rules({"sg-0123456789abcdef0"}, [mine])
    assert mine in rules
    assert ingress_problems(
        {"available_node_types": {}, "provider": {"security_group": {"IpPermissions": rules}}}
    )


# --- the documented ingress commands and IAM policies (header comment) ---------------------------


def header_text() -> str:
    return CLUSTER_YAML.read_text()


def documented_ingress_problems(text: str) -> list[str]:
    problems = [
        f"--cidr {c} is open to the world"
        for c in re.findall(r"--cidr\s+(\S+)", text)
        if _is_world(c)
    ]
    problems += [
        f"--port {p}: only 22 may be opened to a CIDR"
        for p in re.findall(r"--port\s+(\S+)", text)
        if p != "22"
    ]
    if not re.search(r"--protocol tcp --port 22 --cidr \S+/32\b", text):
        problems.append("no SSH rule from a single address (your IP/32)")
    return problems


def test_documented_ingress_commands() -> None:
    assert documented_ingress_problems(header_text()) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("--cidr 203.0.113.7/32", "--cidr 0.0.0.0/0"),
        ("--cidr 203.0.113.7/32", "--cidr ::/0"),
        ("--port 22 --cidr", "--port 8265 --cidr"),
    ],
)
def test_documented_ingress_checker_catches(old: str, new: str) -> None:
    text = header_text()
    assert old in text
    assert documented_ingress_problems(text.replace(old, new))


def documented_policies(text: str) -> dict[str, dict[str, Any]]:
    """The JSON between `# BEGIN policy NAME` and `# END policy NAME`, without the `#`s."""
    blocks = re.findall(r"^# BEGIN policy (\S+)\n(.*?)^# END policy \1$", text, re.M | re.S)
    return {
        name: json.loads("\n".join(line[1:] for line in body.splitlines())) for name, body in blocks
    }


STORE_OBJECTS = "arn:aws:s3:::<BUCKET>/wmbench/*"
STORE_BUCKET = "arn:aws:s3:::<BUCKET>"


def _listify(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def policy_problems(policies: dict[str, dict[str, Any]], worker_role: str) -> list[str]:
    if set(policies) != {"wmbench-store", "wmbench-autoscaler"}:
        return [f"documented policies: {sorted(policies)}"]
    problems = []
    for policy_name, policy in policies.items():
        if "FullAccess" in json.dumps(policy):
            problems.append(f"{policy_name}: mentions FullAccess")
        for st in policy["Statement"]:
            sid = f"{policy_name}/{st.get('Sid')}"
            actions = _listify(st["Action"])
            resources = _listify(st["Resource"])
            if st.get("Effect") != "Allow" or "NotAction" in st or "NotResource" in st:
                problems.append(f"{sid}: only plain Allow statements")
            problems += [
                f"{sid}: wildcard action {a}" for a in actions if a == "*" or a.endswith(":*")
            ]
            if "*" in resources and not all(a.startswith("ec2:Describe") for a in actions):
                problems.append(f"{sid}: Resource * for more than ec2:Describe*")
            for a in actions:
                service = a.split(":")[0]
                if policy_name == "wmbench-store" and service != "s3":
                    problems.append(f"{sid}: {a} in the store policy")
                if policy_name == "wmbench-autoscaler" and service == "s3":
                    problems.append(f"{sid}: {a} belongs in the store policy")
                if a == "s3:ListBucket" and resources != [STORE_BUCKET]:
                    problems.append(f"{sid}: s3:ListBucket on {resources}")
                if service == "s3" and a != "s3:ListBucket" and resources != [STORE_OBJECTS]:
                    problems.append(f"{sid}: {a} on {resources}, not only {STORE_OBJECTS}")
                if service == "iam" and (
                    a != "iam:PassRole"
                    or [r.rsplit(":role/", 1)[-1] for r in resources] != [worker_role]
                    or "iam:PassedToService" not in json.dumps(st.get("Condition", {}))
                ):
                    problems.append(f"{sid}: IAM may only pass the {worker_role} role to EC2")
                if service not in {"s3", "ec2", "iam", "ssm"}:
                    problems.append(f"{sid}: unexpected service {service}")
                if service == "ssm" and a != "ssm:GetParameters":
                    problems.append(f"{sid}: {a}")
            touches_instances = any(r.endswith(":instance/*") for r in resources)
            if touches_instances and "Condition" not in st:
                problems.append(f"{sid}: acts on any instance (no tag condition)")
    return problems


def _worker_role(raw: dict[str, Any]) -> str:
    return _worker(raw)["IamInstanceProfile"]["Arn"].rsplit("/", 1)[-1]


def test_documented_policies_are_least_privilege(raw: dict[str, Any]) -> None:
    policies = documented_policies(header_text())
    assert policies["wmbench-store"]["Version"] == "2012-10-17"
    assert policy_problems(policies, _worker_role(raw)) == []


def _statement(policies: dict[str, Any], sid: str) -> dict[str, Any]:
    (st,) = [s for p in policies.values() for s in p["Statement"] if s.get("Sid") == sid]
    return st


@pytest.mark.parametrize(
    "break_it",
    [
        lambda p: _statement(p, "StoreObjects").update(Action="s3:*"),
        lambda p: _statement(p, "StoreObjects").update(Resource="arn:aws:s3:::<BUCKET>/*"),
        lambda p: _statement(p, "StoreBucket").update(Resource="*"),
        lambda p: _statement(p, "PassWorkerRoleOnly").update(Resource="arn:aws:iam::1:role/*"),
        lambda p: _statement(p, "PassWorkerRoleOnly").pop("Condition"),
        lambda p: _statement(p, "ManageClusterInstances").pop("Condition"),
        lambda p: _statement(p, "LaunchTaggedInstances").pop("Condition"),
        lambda p: _statement(p, "Describe").update(Action=["ec2:*"]),
        lambda p: _statement(p, "Describe").update(Action=["ec2:TerminateInstances"]),
        lambda p: p["wmbench-store"]["Statement"].append(
            {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*"}
        ),
        lambda p: p["wmbench-autoscaler"]["Statement"].append(
            {"Effect": "Allow", "Action": "iam:*", "Resource": "*"}
        ),
        lambda p: p.pop("wmbench-autoscaler"),
    ],
)
def test_policy_checker_catches(raw: dict[str, Any], break_it) -> None:
    policies = documented_policies(header_text())
    break_it(policies)
    assert policy_problems(policies, _worker_role(raw))
