"""The registry on local storage: versions, aliases by conditional write, rollback, audit log,
concurrent promotions from two processes, and the MLflow mirror against a real sqlite store."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pandas as pd
import pytest
from mlops_stubs import make_export, make_profile

from forge.mlops.registry import AliasConflictError, ModelRef, Registry, RegistryError


def export(tmp_path, step: int, acc: float, status: str = "ok") -> str:
    rng = np.random.default_rng(step)
    frame = pd.DataFrame({"a": rng.normal(size=200), "b": rng.normal(size=200)})
    return make_export(
        str(tmp_path / "run" / "exports" / f"step_{step:08d}"),
        rng.normal(size=(2, 2)),
        np.zeros(2),
        metrics={"val/accuracy": acc},
        onnx_status=status,
        profile=make_profile(frame),
    )


@pytest.fixture()
def reg(tmp_path) -> Registry:
    return Registry(str(tmp_path / "registry"))


def test_register_versions_and_resolve(reg, tmp_path):
    v1 = reg.register("tabular", export(tmp_path, 100, 0.9), reason="first")
    v2 = reg.register("tabular", export(tmp_path, 200, 0.95))
    assert (v1.version, v2.version) == (1, 2)
    assert reg.versions("tabular") == [1, 2] and reg.models() == ["tabular"]
    assert v2.metrics == {"val/accuracy": 0.95}
    assert v2.meta["data_fingerprint"] == "0" * 64
    assert v2.meta["source_run"] == str(tmp_path / "run")
    assert v2.profile().features == ["a", "b"]
    assert v2.export_manifest["format"] == "forge.export"
    assert reg.resolve("registry://tabular").version == 2
    assert reg.resolve("tabular:1").version == 1
    reg.promote("tabular", 1, "champion")
    assert reg.resolve("registry://tabular@champion").version == 1
    assert str(ModelRef.parse("tabular@champion")) == "registry://tabular@champion"
    with pytest.raises(RegistryError, match="committed versions: \\[1, 2\\]"):
        reg.resolve("tabular:7")
    with pytest.raises(RegistryError, match="alias is not set"):
        reg.resolve("tabular@challenger")


def test_promote_records_previous_and_rollback_is_one_step(reg, tmp_path):
    for step in (1, 2, 3):
        reg.register("m", export(tmp_path, step, 0.9))
    reg.promote("m", 1, reason="launch")
    second = reg.promote("m", 3, reason="better")
    assert second["previous"] == 1 and second["generation"] == 2
    back = reg.rollback("m", reason="bad latency")
    assert back["version"] == 1 and back["previous"] == 3
    assert reg.resolve("m@champion").version == 1
    actions = [(e["action"], e.get("version")) for e in reg.audit("m")]
    assert actions == [
        ("register", 1),
        ("register", 2),
        ("register", 3),
        ("promote", 1),
        ("promote", 3),
        ("rollback", 1),
    ]
    assert reg.audit("m")[-1]["reason"] == "bad latency"
    assert all("actor" in e and "time" in e for e in reg.audit("m"))


def test_rollback_without_history_is_refused(reg, tmp_path):
    reg.register("m", export(tmp_path, 1, 0.9))
    reg.promote("m", 1)
    with pytest.raises(RegistryError, match="no previous version"):
        reg.rollback("m")


def test_stale_promotion_is_a_conflict(reg, tmp_path):
    reg.register("m", export(tmp_path, 1, 0.9))
    reg.register("m", export(tmp_path, 2, 0.9))
    reg.promote("m", 1)
    with pytest.raises(AliasConflictError, match="moved by"):
        reg.promote("m", 2, expected_generation=0)  # decided before v1's promotion landed
    assert reg.resolve("m@champion").version == 1


class _RaceRegistry(Registry):
    """Waits at a barrier right after reading the alias's generation, so both processes
    decide on the same generation and then write at the same moment: the real race."""

    barrier = None

    def _generation(self, name: str, alias: str) -> int:
        generation = super()._generation(name, alias)
        if self.barrier is not None:
            barrier, self.barrier = self.barrier, None
            barrier.wait()
        return generation


def _promote_at_once(root: str, version: int, barrier, results) -> None:
    reg = _RaceRegistry(root)
    reg.barrier = barrier
    try:
        reg.promote("m", version, reason=f"process {os.getpid()}")
        results.put(("won", version))
    except AliasConflictError:
        results.put(("lost", version))


def test_two_processes_promoting_at_once(reg, tmp_path):
    for step in (1, 2, 3):
        reg.register("m", export(tmp_path, step, 0.9))
    reg.promote("m", 1)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_promote_at_once, args=(reg.uri, v, barrier, results)) for v in (2, 3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcome = sorted(results.get(timeout=5) for _ in procs)
    assert [o[0] for o in outcome] == ["lost", "won"]
    winner = next(v for o, v in outcome if o == "won")
    loser = next(v for o, v in outcome if o == "lost")
    record = reg.alias("m", "champion")
    assert record["version"] == winner and record["generation"] == 2 and record["previous"] == 1
    entries = [e for e in reg.audit("m") if e["action"].startswith("promote")][1:]
    assert sorted((e["action"], e["version"]) for e in entries) == sorted(
        [("promote", winner), ("promote-conflict", loser)]
    )
    assert next(e for e in entries if e["action"] == "promote-conflict")["winner"] == winner


def test_uncommitted_or_failed_exports_are_refused(reg, tmp_path):
    with pytest.raises(RegistryError, match="no manifest.json"):
        reg.register("m", str(tmp_path / "nothing"))
    with pytest.raises(RegistryError, match="no format passed export"):
        reg.register("m", export(tmp_path, 1, 0.9, status="failed"))
    path = export(tmp_path, 2, 0.9)
    with open(os.path.join(path, "model.onnx"), "ab") as f:
        f.write(b"x")
    with pytest.raises(RegistryError, match="does not match the export's manifest"):
        reg.register("m", path)
    assert reg.versions("m") == []


def test_a_tampered_version_is_not_served(reg, tmp_path):
    v = reg.register("m", export(tmp_path, 1, 0.9))
    with open(os.path.join(v.uri, "export", "model.onnx"), "ab") as f:
        f.write(b"x")
    with pytest.raises(RegistryError, match="does not match the version's manifest"):
        reg.get("m", 1).read("export/model.onnx")


def test_a_version_without_manifest_does_not_exist(reg, tmp_path):
    v = reg.register("m", export(tmp_path, 1, 0.9))
    os.remove(os.path.join(v.uri, "manifest.json"))  # as if the commit never happened
    assert reg.versions("m") == []
    assert reg.register("m", export(tmp_path, 2, 0.9)).version == 2  # numbers never reused


def test_mlflow_mirror_against_a_real_sqlite_store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = Registry(str(tmp_path / "registry"), mlflow_uri=uri)
    reg.register("tabular", export(tmp_path, 1, 0.9))
    reg.register("tabular", export(tmp_path, 2, 0.95))
    reg.promote("tabular", 2, "champion")
    reg.promote("tabular", 1, "champion")
    reg.rollback("tabular")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name='tabular'")
    assert sorted(v.tags["forge.version"] for v in versions) == ["1", "2"]
    champion = client.get_model_version_by_alias("tabular", "champion")
    assert champion.tags["forge.version"] == "2"
    assert champion.source.endswith("versions/000002/export")
    assert json.loads(json.dumps(client.get_registered_model("tabular").aliases)) == {
        "champion": champion.version
    }
