"""Batch scoring on the shared Ray cluster: Ray Data map_batches over the ONNX artifact,
predictions equal to onnxruntime's on the same rows, keys beside them, committed output."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlops_stubs import make_export, make_profile

from forge.checkpoint.manifest import FileEntry
from forge.checkpoint.storage import StorageOptions
from forge.errors import ConfigError
from forge.mlops.registry import Registry
from forge.mlops.score import score
from forge.mlops.specs import ScoreSpec

pytestmark = pytest.mark.ray


def test_score_with_ray_data(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    data = pd.DataFrame({"a": rng.normal(size=600), "b": rng.normal(size=600)})
    data["y"] = (data["a"] > 0).astype(int)
    weights = np.array([[-1.0, 1.0], [0.5, -0.5]])
    make_export(
        str(tmp_path / "run" / "exports" / "s"),
        weights,
        np.zeros(2),
        profile=make_profile(data, label="y"),
    )
    reg = Registry(str(tmp_path / "reg"))
    mv = reg.register("m", str(tmp_path / "run" / "exports" / "s"))
    batch = data.assign(id=np.arange(600))
    (tmp_path / "in").mkdir()
    batch.iloc[:300].to_parquet(tmp_path / "in" / "p0.parquet")
    batch.iloc[300:].to_parquet(tmp_path / "in" / "p1.parquet")
    out = tmp_path / "scores"
    spec = ScoreSpec(out=str(out), batch_size=128, keys=("id", "y"))
    result = score(mv, str(tmp_path / "in"), spec, StorageOptions(), ray_address=ray_cluster)
    assert result["rows"] == 600
    got = pd.concat(pd.read_parquet(p) for p in sorted((out / "predictions").glob("*.parquet")))
    got = got.sort_values("id")
    logits = batch[["a", "b"]].to_numpy() @ weights
    assert got["prediction"].tolist() == logits.argmax(axis=1).tolist()
    assert list(got.columns) == ["id", "y", "prediction", "probability"]
    manifest = json.loads((out / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        assert FileEntry.of((out / rel).read_bytes()).sha256 == entry["sha256"]
    profile = json.loads((out / "data_profile.json").read_text())
    assert set(profile["columns"]) == {"a", "b", "prediction", "probability"}
    assert profile["label_distribution"] == {
        str(k): int(v) for k, v in data["y"].value_counts().sort_index().items()
    }
    with pytest.raises(ConfigError, match="holds committed scores"):
        score(mv, str(tmp_path / "in"), spec, StorageOptions(), ray_address=ray_cluster)
    batch.drop(columns=["b"]).to_parquet(tmp_path / "in" / "p2.parquet")
    with pytest.raises(ConfigError, match="lacks 1 of the model's input columns: 'b'"):
        score(mv, str(tmp_path / "in"), ScoreSpec(out=str(tmp_path / "o2")), StorageOptions())
