"""cluster/rayjob.yaml is a KubeRay RayJob that runs the harness, checked offline.

No Kubernetes API server is reachable here, so `check_manifest` checks the fields KubeRay
documents for ray.io/v1 (RayJobSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec in
KubeRay's API reference) plus what this project needs: the harness entrypoint on an s3://
store, GPUs only on the worker group, images pinned to the installed Ray, token auth, a
ClusterIP head, and S3 access through IRSA instead of keys. Every check is shown to fail on a
broken copy of the manifest.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
RAYJOB_YAML = REPO_ROOT / "cluster" / "rayjob.yaml"

# ray.io/v1 RayJobSpec fields, from KubeRay's API reference (docs/reference/api.md) and
# ray-operator/apis/ray/v1/rayjob_types.go. KubeRay versions differ slightly at the edges
# (`deletionPolicy` before `deletionStrategy`; `schedule` in some versions; newer ones add
# `ttlSecondsBeforeRunning`); none of those is used here.
RAYJOB_SPEC_FIELDS = frozenset(
    {
        "entrypoint",
        "runtimeEnvYAML",
        "jobId",
        "shutdownAfterJobFinishes",
        "ttlSecondsAfterFinished",
        "activeDeadlineSeconds",
        "rayClusterSpec",
        "clusterSelector",
        "submissionMode",
        "submitterPodTemplate",
        "suspend",
        "entrypointNumCpus",
        "entrypointNumGpus",
        "entrypointResources",
        "backoffLimit",
        "managedBy",
        "deletionStrategy",
        "metadata",
        "submitterConfig",
    }
)
AWS_KEY_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
IRSA = "eks.amazonaws.com/role-arn"
GPU = "nvidia.com/gpu"


class ManifestError(ValueError):
    pass


def _need(ok: Any, message: str) -> None:
    if not ok:
        raise ManifestError(message)


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template.get("spec", {}).get("containers") or []


def _gpus(container: dict[str, Any]) -> int:
    res = container.get("resources", {})
    return max(int(res.get(k, {}).get(GPU, 0)) for k in ("limits", "requests"))


def check_manifest(docs: list[dict[str, Any]], ray_version: str) -> None:
    """Raise ManifestError on the first problem in the documents of cluster/rayjob.yaml."""
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    _need(len(jobs) == 1, f"expected one RayJob, got {len(jobs)}")
    job = jobs[0]
    _need(job.get("apiVersion") == "ray.io/v1", "apiVersion must be ray.io/v1")
    _need(job.get("metadata", {}).get("name"), "metadata.name is required")
    spec = job.get("spec")
    _need(isinstance(spec, dict), "spec is required")
    unknown = set(spec) - RAYJOB_SPEC_FIELDS
    _need(not unknown, f"unknown RayJob spec fields: {sorted(unknown)}")
    _need(spec.get("submissionMode") == "K8sJobMode", "submissionMode must be K8sJobMode")
    _need(spec.get("shutdownAfterJobFinishes") is True, "shutdownAfterJobFinishes must be true")
    ttl = spec.get("ttlSecondsAfterFinished")
    _need(isinstance(ttl, int) and ttl >= 0, "ttlSecondsAfterFinished must be set")

    # The entrypoint: the harness, on the running cluster, writing to shared storage.
    entrypoint = spec.get("entrypoint", "")
    _need(not set("<>|;&`$") & set(entrypoint), "entrypoint has shell metacharacters")
    argv = shlex.split(entrypoint)
    _need(argv[:2] == ["harness", "run"], "entrypoint must start with `harness run`")
    pairs = dict(zip(argv, argv[1:], strict=False))
    _need(pairs.get("--address") == "auto", "entrypoint must pass --address auto")
    _need(re.fullmatch(r"s3://[^/\s]+/\S+", pairs.get("--store", "")), "--store must be s3://")

    cluster = spec.get("rayClusterSpec")
    _need(isinstance(cluster, dict), "rayClusterSpec is required")
    _need(cluster.get("rayVersion") == ray_version, f"rayVersion must be {ray_version}")
    _need(cluster.get("authOptions", {}).get("mode") == "token", "token auth must be on")
    head = cluster.get("headGroupSpec")
    _need(isinstance(head, dict), "headGroupSpec is required")
    _need(head.get("serviceType", "ClusterIP") == "ClusterIP", "head service must be ClusterIP")
    _need(not head.get("enableIngress"), "no Ingress for the head")
    groups = cluster.get("workerGroupSpecs") or []
    _need(groups, "workerGroupSpecs is required")
    pods = {"head": head}
    for g in groups:
        name = g.get("groupName")
        _need(name, "every worker group needs a groupName")
        for key in ("replicas", "minReplicas", "maxReplicas"):
            _need(isinstance(g.get(key), int), f"{name}: {key} must be an integer")
        _need(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{name}: replicas range")
        pods[name] = g
    for name, group in pods.items():
        params = group.get("rayStartParams")
        _need(isinstance(params, dict), f"{name}: rayStartParams is required")
        bad = {k: v for k, v in params.items() if not isinstance(v, str)}
        _need(not bad, f"{name}: rayStartParams values must be strings: {bad}")
        template = group.get("template", {})
        _need(_containers(template), f"{name}: template.spec.containers is required")

    # GPUs: only on the worker group named gpu; the head advertises none.
    _need(head["rayStartParams"].get("num-gpus", "0") == "0", "head: num-gpus must be 0")
    _need(not any(_gpus(c) for c in _containers(head["template"])), "head requests a GPU")
    _need(
        "gpu" in pods and any(_gpus(c) >= 1 for c in _containers(pods["gpu"]["template"])),
        f"worker group `gpu` must request {GPU}",
    )

    # Images: every one pinned to the installed Ray, no floating tags.
    templates = [g["template"] for g in pods.values()] + [spec.get("submitterPodTemplate", {})]
    pin = re.compile(rf"(?<![\d.]){re.escape(ray_version)}(?![\d.])")
    for container in (c for t in templates for c in _containers(t)):
        image = container.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        _need(pin.search(tag), f"{container.get('name')}: image tag must pin Ray {ray_version}")

    # Credentials: IRSA on the Ray pods' ServiceAccount; no keys anywhere.
    _need(not [d for d in docs if d.get("kind") == "Secret"], "no Secret in the manifest")
    accounts = {
        d["metadata"]["name"]: d["metadata"].get("annotations", {})
        for d in docs
        if d.get("kind") == "ServiceAccount"
    }
    for name, group in pods.items():
        account = group["template"].get("spec", {}).get("serviceAccountName")
        _need(account in accounts, f"{name}: must run as a ServiceAccount from this file")
        role = accounts[account].get(IRSA, "")
        _need(re.match(r"arn:aws:iam::\S+:role/\S+$", role), f"{account}: no IRSA role")
    for container in (c for t in templates for c in _containers(t)):
        names = {e.get("name") for e in container.get("env", [])}
        _need(not names & AWS_KEY_ENV, f"{container.get('name')}: AWS keys in env")
    _need(not AWS_KEY_ID.search(yaml.safe_dump_all(docs)), "an AWS access key id is present")


def load() -> list[dict[str, Any]]:
    with RAYJOB_YAML.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert all(isinstance(d, dict) for d in docs)
    return docs


@pytest.fixture
def docs() -> list[dict[str, Any]]:
    return load()


def rayjob(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = [d for d in docs if d.get("kind") == "RayJob"]
    return job


def cluster_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return rayjob(docs)["spec"]["rayClusterSpec"]


def head(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return cluster_spec(docs)["headGroupSpec"]


def gpu_group(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (group,) = [g for g in cluster_spec(docs)["workerGroupSpecs"] if g["groupName"] == "gpu"]
    return group


def container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


def test_manifest_passes(docs: list[dict[str, Any]]) -> None:
    check_manifest(docs, ray.__version__)


def test_manifest_values(docs: list[dict[str, Any]]) -> None:
    job = rayjob(docs)
    assert job["kind"] == "RayJob" and job["metadata"]["name"] == "wmbench-smoke"
    assert shlex.split(job["spec"]["entrypoint"])[:3] == ["harness", "run", "scenarios/smoke.yaml"]
    assert (REPO_ROOT / "scenarios" / "smoke.yaml").is_file()
    # The entrypoint's relative path resolves in the head container's workingDir.
    assert container(head(docs))["workingDir"] == "/home/ray/wmbench"
    # In K8sJobMode the submitter pod reaches the dashboard through the head service.
    assert head(docs)["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert container(gpu_group(docs))["resources"]["limits"][GPU] == 1
    assert cluster_spec(docs)["rayVersion"] == ray.__version__


def _set_entrypoint(value: str):
    return lambda d: rayjob(d)["spec"].update(entrypoint=value)


BREAKAGES = {
    "not-the-harness": (_set_entrypoint("python run.py --address auto"), "harness run"),
    "no-address-auto": (
        _set_entrypoint("harness run scenarios/smoke.yaml --store s3://b/wmbench"),
        "--address auto",
    ),
    "local-store": (
        _set_entrypoint("harness run scenarios/smoke.yaml --address auto --store ./store"),
        "s3://",
    ),
    "shell-placeholder": (
        _set_entrypoint("harness run s.yaml --address auto --store s3://<bucket>/wmbench"),
        "metacharacters",
    ),
    "unknown-spec-key": (
        lambda d: rayjob(d)["spec"].update(shutdownAfterJobFinish=True),
        "unknown RayJob spec fields",
    ),
    "no-apiversion": (lambda d: rayjob(d).pop("apiVersion"), "apiVersion"),
    "no-name": (lambda d: rayjob(d)["metadata"].pop("name"), "metadata.name"),
    "http-mode": (lambda d: rayjob(d)["spec"].update(submissionMode="HTTPMode"), "K8sJobMode"),
    "kept-alive": (
        lambda d: rayjob(d)["spec"].update(shutdownAfterJobFinishes=False),
        "shutdownAfterJobFinishes",
    ),
    "no-gpu-request": (
        lambda d: container(gpu_group(d))["resources"]["limits"].pop(GPU),
        "must request nvidia.com/gpu",
    ),
    "no-gpu-group": (lambda d: gpu_group(d).update(groupName="cpu"), "worker group `gpu`"),
    "head-gpu": (
        lambda d: container(head(d))["resources"]["limits"].update({GPU: 1}),
        "head requests a GPU",
    ),
    "head-num-gpus": (
        lambda d: head(d)["rayStartParams"].update({"num-gpus": "1"}),
        "num-gpus",
    ),
    "replicas-above-max": (lambda d: gpu_group(d).update(replicas=9), "replicas range"),
    "no-group-name": (lambda d: gpu_group(d).pop("groupName"), "groupName"),
    "int-start-param": (
        lambda d: head(d)["rayStartParams"].update({"num-cpus": 0}),
        "must be strings",
    ),
    "no-head-containers": (lambda d: head(d)["template"]["spec"].pop("containers"), "containers"),
    "other-ray-image": (
        lambda d: container(gpu_group(d)).update(image="rayproject/ray:2.9.0-py312-gpu"),
        "pin Ray",
    ),
    "latest-image": (
        lambda d: container(head(d)).update(image="rayproject/ray:latest"),
        "pin Ray",
    ),
    "other-ray-version": (lambda d: cluster_spec(d).update(rayVersion="2.9.0"), "rayVersion"),
    "auth-off": (lambda d: cluster_spec(d).update(authOptions={"mode": "disabled"}), "token"),
    "load-balancer": (lambda d: head(d).update(serviceType="LoadBalancer"), "ClusterIP"),
    "secret-env": (
        lambda d: (
            container(gpu_group(d))
            .setdefault("env", [])
            .append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"})
        ),
        "AWS keys",
    ),
    "key-id-in-text": (
        lambda d: rayjob(d)["metadata"].update(annotations={"k": "AKIAABCDEFGHIJKLMNOP"}),
        "access key id",
    ),
    "secret-doc": (
        lambda d: d.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "aws"}}),
        "no Secret",
    ),
    "no-irsa": (
        lambda d: next(x for x in d if x["kind"] == "ServiceAccount")["metadata"].pop(
            "annotations"
        ),
        "no IRSA role",
    ),
    "default-service-account": (
        lambda d: gpu_group(d)["template"]["spec"].pop("serviceAccountName"),
        "ServiceAccount",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_checker_catches(docs: list[dict[str, Any]], case: str) -> None:
    break_it, message = BREAKAGES[case]
    bad = copy.deepcopy(docs)
    break_it(bad)
    with pytest.raises(ManifestError, match=re.escape(message)):
        check_manifest(bad, ray.__version__)
