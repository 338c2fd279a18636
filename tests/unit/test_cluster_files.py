"""cluster.yaml against the schema the installed Ray ships, and the KubeRay RayJob example."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _ray_schema() -> dict:
    import importlib.util

    # ray/autoscaler/ray-schema.json of the installed Ray; found without importing ray.
    origin = importlib.util.find_spec("ray").origin
    return json.loads((Path(origin).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema(cluster_config: dict) -> None:
    jsonschema.validate(cluster_config, _ray_schema())


def test_cluster_yaml_has_cpu_head_gpu_and_cpu_workers(cluster_config: dict) -> None:
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 8]
    cpu = [
        name
        for name, t in types.items()
        if name != cluster_config["head_node_type"] and t["resources"].get("GPU", 0) == 0
    ]
    assert gpu and cpu
    for t in types.values():
        assert t.get("min_workers", 0) <= t.get("max_workers", 0) <= cluster_config["max_workers"]
    assert cluster_config["idle_timeout_minutes"] > 0
    setup = " ".join(cluster_config["setup_commands"])
    assert "requirements/constraints.txt" in setup and "torch" in setup
    assert cluster_config["provider"]["type"] == "aws"


@pytest.mark.parametrize(
    "mutate, word",
    [
        (lambda c: c.update(max_worker=c.pop("max_workers")), "max_worker"),
        (lambda c: c["available_node_types"]["gpu_8x"].update(max_worker=4), "max_worker"),
        (lambda c: c["available_node_types"]["gpu_8x"].pop("resources"), "resources"),
        (lambda c: c.update(idle_timeout_minutes="10"), "idle_timeout_minutes"),
    ],
    ids=["top-level typo", "node-type typo", "missing resources", "wrong type"],
)
def test_schema_catches_mistakes(cluster_config: dict, mutate, word: str) -> None:
    broken = copy.deepcopy(cluster_config)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(broken, _ray_schema())
    assert word in str(info.value)


def _rayjob() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())


def test_kuberay_rayjob_has_required_fields() -> None:
    job = _rayjob()
    # What the RayJob CRD (ray.io/v1) requires, and what forge's example relies on.
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m forge ")
    assert "ray.address=auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # The Ray token comes from a Kubernetes secret, never written in the manifest.
    text = (ROOT / "deploy" / "kuberay-rayjob.yaml").read_text()
    assert "secretKeyRef" in text


def test_kuberay_entrypoint_overrides_are_valid() -> None:
    """The example's overrides compose and validate (a typo there would only fail on k8s)."""
    import shlex

    from forge.config.compose import compose
    from forge.config.validate import to_run_spec

    args = shlex.split(_rayjob()["spec"]["entrypoint"])[3:]
    spec = to_run_spec(compose(args))
    assert spec.scaling.use_gpu and spec.scaling.num_workers == 16
    assert spec.storage.uri.startswith("s3://")
