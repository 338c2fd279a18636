"""Stand-ins for the mlops tests: a profiler that builds a ``data_profile.json`` dict exactly as
docs/FORMATS.md describes it (10 equal-frequency bins from the quantiles, duplicates merged),
and an exporter that writes a committed export folder (a real linear ONNX model) in the
docs/FORMATS.md layout.

Test-only: forge's profiler and exporter are forge.data's and forge.export's (issues 13, 11);
these keep the mlops tests independent of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def make_profile(frame: pd.DataFrame, label: str | None = None, bins: int = 10) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    for name in frame.columns:
        s = frame[name]
        present = s.dropna()
        if pd.api.types.is_numeric_dtype(s) and name != label:
            v = present.to_numpy(dtype=float)
            edges = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)))
            idx = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2)
            columns[name] = {
                "kind": "numeric",
                "dtype": str(s.dtype),
                "count": int(len(v)),
                "null_fraction": float(s.isna().mean()),
                "mean": float(v.mean()),
                "std": float(v.std()),
                "min": float(v.min()),
                "max": float(v.max()),
                "quantiles": {str(q): float(np.quantile(v, q)) for q in QUANTILES},
                "histogram": {
                    "edges": edges.tolist(),
                    "counts": np.bincount(idx, minlength=len(edges) - 1).tolist(),
                },
            }
        else:
            counts = present.astype(str).value_counts()
            columns[name] = {
                "kind": "categorical",
                "dtype": "string",
                "count": int(len(present)),
                "null_fraction": float(s.isna().mean()),
                "counts": {str(k): int(c) for k, c in counts.items()},
            }
    profile = {
        "format": "forge.data_profile",
        "version": 1,
        "source": "test",
        "fingerprint": "0" * 64,
        "rows": len(frame),
        "label": label,
        "columns": columns,
    }
    if label is not None:
        profile["label_distribution"] = columns[label]["counts"]
    return profile


def make_onnx(weights: np.ndarray, bias: np.ndarray) -> bytes:
    """A real ONNX model ``logits = x @ weights + bias`` (input ``x`` float32 [batch, F])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    features, classes = weights.shape
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [
            numpy_helper.from_array(weights.astype(np.float32), "w"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_export(
    uri: str,
    weights: np.ndarray,
    bias: np.ndarray,
    metrics: dict[str, float] | None = None,
    onnx_status: str = "ok",
    profile: dict[str, Any] | None = None,
    options: Any = None,
) -> str:
    """A committed export folder as docs/FORMATS.md describes it (model.onnx, config.json,
    manifest.json last); with ``profile``, also the run folder's data_profile.json two levels
    up when ``uri`` ends in ``exports/<step>``. Returns ``uri``."""
    import hashlib
    import json

    from forge.checkpoint import storage

    features, classes = weights.shape
    files = {
        "model.onnx": make_onnx(weights, bias),
        "config.json": json.dumps({"recipe": "stub"}).encode(),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(uri, name), data, options)
    if profile is not None:
        run = uri.rstrip("/").rsplit("/", 2)[0]
        storage.write_bytes(
            storage.join(run, "data_profile.json"), json.dumps(profile).encode(), options
        )
    manifest = {
        "format": "forge.export",
        "version": 1,
        "files": {
            n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()
        },
        "source_checkpoint": storage.join(uri.rstrip("/").rsplit("/", 2)[0], "checkpoints/x"),
        "recipe": {"name": "stub", "module": "tests.stub", "params": {}},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", features]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", classes]}],
        "formats": {"onnx": {"status": onnx_status, "files": ["model.onnx"], "opset": 18}},
        "metrics": metrics or {},
        "versions": {},
    }
    storage.write_bytes(storage.join(uri, "manifest.json"), json.dumps(manifest).encode(), options)
    return uri
