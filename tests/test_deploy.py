"""What operators get: the Kubernetes Job checked against the real Kubernetes schema (offline),
and the Dockerfile checked statically (no Docker engine runs here)."""

from __future__ import annotations

import copy
import re
import socket
import tomllib
from pathlib import Path

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")

ROOT = Path(__file__).resolve().parent.parent
JOB_YAML = ROOT / "deploy" / "kubernetes" / "job.yaml"
# backoffLimitPerIndex is GA from 1.33, podReplacementPolicy beta (on by default) from 1.29
K8S_VERSIONS = ["1.33.0", kv.latest_version()]


@pytest.fixture
def no_network(monkeypatch):
    """Schema validation must work offline: any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def manifests() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(JOB_YAML.read_text("utf-8")) if doc]


def the(kind: str) -> dict:
    [doc] = [d for d in manifests() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema(no_network, version):
    docs = manifests()
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Job", "Service"]
    for doc in docs:
        kv.validate(doc, version, strict=True)


def test_the_validator_rejects_a_broken_job(no_network):
    job = copy.deepcopy(the("Job"))
    job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["operatr"] = "In"  # a typo'd field
    with pytest.raises(kv.ValidationError):
        kv.validate(job, "1.33.0", strict=True)
    job = copy.deepcopy(the("Job"))
    job["spec"]["backoffLimitPerIndex"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(job, "1.33.0", strict=True)


def test_the_job_is_indexed_and_fails_an_index_on_a_fatal_exit():
    spec = the("Job")["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] <= spec["completions"]
    assert spec["backoffLimitPerIndex"] >= 1 and spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    fatal = [r for r in rules if r["action"] == "FailIndex"]
    assert fatal and fatal[0]["onExitCodes"] == {"containerName": "batcher", "operator": "In", "values": [4]}
    ignored = [r for r in rules if r["action"] == "Ignore"]
    assert ignored[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_the_container_runs_one_shard_with_the_shared_limiter_and_a_secret_key():
    job = the("Job")
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = container["args"]
    assert args[:2] == ["run", "/job/job.yaml"]
    assert args[args.index("--out") + 1].startswith("s3://")
    assert int(args[args.index("--shards") + 1]) == job["spec"]["completions"]
    limiter = args[args.index("--limiter") + 1]
    service = the("Service")
    assert limiter == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"
    [key] = [e for e in container["env"] if e["name"] == "BATCHER_API_KEY"]
    assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["job"]["mountPath"] == "/job" and volumes["job"]["configMap"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # the Service selects the Redis Deployment's pods
    assert service["spec"]["selector"].items() <= the("Deployment")["spec"]["template"]["metadata"]["labels"].items()


def test_nothing_secret_is_written_in_the_manifests():
    text = JOB_YAML.read_text("utf-8")
    assert not re.search(r"sk-[A-Za-z0-9]{8,}", text)


def test_dockerfile_builds_the_package_as_a_non_root_batcher_entrypoint():
    text = (ROOT / "Dockerfile").read_text("utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    install = next(line for line in lines if "pip install" in line)
    extras = re.search(r"\.\[([a-z0-9,]+)\]", install).group(1).split(",")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    assert set(extras) == {"redis", "s3"} <= set(project["optional-dependencies"])
    assert project["scripts"]["batcher"] and 'ENTRYPOINT ["batcher"]' in lines
    user = [line for line in lines if line.startswith("USER ")][-1]
    assert user.split()[1].split(":")[0] not in ("root", "0")
    # the package build reads README.md (pyproject `readme`): it must be copied before pip install
    assert project["readme"] == "README.md" and lines.index(install) > lines.index("COPY pyproject.toml README.md ./")
    # and the pod's runAsUser is the image's user
    assert the("Job")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user.split()[1].split(":")[0])
