"""Batch scoring: Ray Data ``map_batches`` over a registered model's ONNX artifact.

Before Ray starts, every input file's columns are checked against the model's inputs (its
reference profile's features). The scored output is a committed folder::

    <score.out>/predictions/*.parquet   keys (score.keys) + prediction + probability
    <score.out>/data_profile.json       profile of the scored inputs and the predictions
    <score.out>/manifest.json           written last: every file's size and sha256, the model
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from forge.checkpoint import storage
from forge.checkpoint.manifest import FileEntry
from forge.checkpoint.storage import StorageOptions
from forge.errors import ConfigError
from forge.mlops.scoring import OnnxScorer
from forge.mlops.specs import ScoreSpec

SCORES_FORMAT = "forge.scores"


class _ScoreBatch:
    """A Ray Data actor: one onnxruntime session, reused for every batch it gets."""

    def __init__(self, model: bytes, features: list[str], keys: list[str]) -> None:
        self.scorer = OnnxScorer(model, features)
        self.keep = list(dict.fromkeys([*keys, *features]))

    def __call__(self, batch: Any) -> Any:
        out = batch[self.keep].copy()
        predicted = self.scorer.predict(batch)
        out["prediction"] = predicted["prediction"]
        out["probability"] = predicted["probability"]
        return out


def check_source_columns(source: Any, features: list[str]) -> list[str]:
    """Every file's column names, checked to hold ``features``; returns the first file's.

    Raises:
        ConfigError: A file lacks model inputs (names the file and the columns).
    """
    import pyarrow.parquet as pq

    from forge.data.source import arrow_filesystem, arrow_path, read_batches

    fs = arrow_filesystem(source)
    first: list[str] | None = None
    for file in source.files:
        if source.format == "parquet":
            with fs.open_input_file(arrow_path(file.path)) as handle:
                names = pq.read_schema(handle).names
        else:
            names = list(next(iter(read_batches(source, batch_rows=1))).columns)
        missing = [c for c in features if c not in names]
        if missing:
            raise ConfigError(
                f"{file.path} lacks {len(missing)} of the model's input columns: "
                f"{', '.join(map(repr, missing[:10]))}. Score data with the columns the model "
                "was trained on."
            )
        first = first or names
    return first or []


def score(
    mv: Any,
    source_uri: str,
    spec: ScoreSpec,
    options: StorageOptions,
    *,
    fmt: str | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Score ``source_uri`` with registry version ``mv`` into ``spec.out``.

    Returns:
        ``{"rows", "out", "files"}``.

    Raises:
        ConfigError: Missing input columns, an ONNX export that is not servable, or an
            existing committed output at ``spec.out``.
    """
    import ray

    from forge.cluster import ray_session
    from forge.config.specs import RaySpec
    from forge.data.profile import ProfileBuilder, dumps
    from forge.data.source import arrow_filesystem, arrow_path, resolve

    out = storage.normalize(spec.out)
    if storage.exists(storage.join(out, "manifest.json"), options):
        raise ConfigError(f"score.out={out} holds committed scores already; pick a new folder.")
    scorer = OnnxScorer.from_version(mv)  # refuses a non-servable export before Ray starts
    features = scorer.features
    source = resolve(source_uri, fmt, options)
    names = check_source_columns(source, features)
    label = mv.profile().label
    keys = list(spec.keys) if spec.keys is not None else [c for c in names if c not in features]
    missing_keys = [k for k in keys if k not in names]
    if missing_keys:
        raise ConfigError(f"score.keys: {missing_keys} are not columns of {source_uri}.")
    model = mv.read(f"export/{mv.export_manifest['formats']['onnx']['files'][0]}")
    predictions_uri = storage.join(out, "predictions")
    with ray_session(RaySpec(address=ray_address)):
        read = ray.data.read_parquet if source.format == "parquet" else ray.data.read_csv
        # Reads take no CPU slot: the scoring actors may hold every CPU of a small cluster,
        # and reads that wait for one would wait forever.
        ds = read(
            [arrow_path(p) for p in source.paths],
            filesystem=arrow_filesystem(source),
            file_extensions=None,
            num_cpus=0,
        )
        scored = ds.map_batches(
            _ScoreBatch,
            fn_constructor_kwargs={"model": model, "features": features, "keys": keys},
            batch_format="pandas",
            batch_size=spec.batch_size,
            compute=ray.data.ActorPoolStrategy(size=spec.concurrency),
            num_cpus=1,
        ).materialize()
        scored.select_columns([*keys, "prediction", "probability"]).write_parquet(
            arrow_path(predictions_uri) if storage.is_s3(out) else predictions_uri,
            filesystem=arrow_filesystem(source) if storage.is_s3(out) else None,
        )
        # The profile of what was scored (inputs + predictions), the same profiler as the
        # training data's, so a later monitor run can compare like with like.
        drop = [k for k in keys if k != label]

        def batches() -> Any:
            for batch in scored.iter_batches(batch_format="pandas", batch_size=65_536):
                yield batch.drop(columns=drop)

        builder = ProfileBuilder(label=label if label in keys else None)
        for batch in batches():
            builder.update(batch)
        profile = builder.finish(
            source=source_uri, fingerprint=mv.meta.get("data_fingerprint") or "", rescan=batches
        )
    files: dict[str, FileEntry] = {}
    for rel in scored_files(out, options):
        data = storage.read_bytes(storage.join(out, rel), options)
        files[rel] = FileEntry.of(data)
    profile_bytes = dumps(profile)
    storage.write_bytes(storage.join(out, "data_profile.json"), profile_bytes, options)
    files["data_profile.json"] = FileEntry.of(profile_bytes)
    manifest = {
        "format": SCORES_FORMAT,
        "version": 1,
        "model": str(mv),
        "source": source_uri,
        "rows": profile["rows"],
        "created_at": time.time(),
        "files": {k: v.__dict__ for k, v in files.items()},
    }
    storage.write_bytes(
        storage.join(out, "manifest.json"), json.dumps(manifest, indent=1).encode(), options
    )
    return {"rows": profile["rows"], "out": out, "files": sorted(files)}


def scored_files(out: str, options: StorageOptions) -> list[str]:
    """Relative paths of the prediction Parquet files under ``out``."""
    entries = storage.list_dir(storage.join(out, "predictions"), options)
    return sorted(f"predictions/{e['name']}" for e in entries if e["name"].endswith(".parquet"))


def prediction_profile(predictions: np.ndarray) -> dict[str, Any]:
    """A categorical profile entry of class predictions, for prediction drift.

    Example:
        >>> prediction_profile(np.array([0, 1, 1]))
        {'kind': 'categorical', 'count': 3, 'null_fraction': 0.0, 'counts': {'0': 1, '1': 2}}
    """
    values, counts = np.unique(predictions.astype(str), return_counts=True)
    return {
        "kind": "categorical",
        "count": int(counts.sum()),
        "null_fraction": 0.0,
        "counts": dict(zip(values.tolist(), counts.astype(int).tolist(), strict=True)),
    }
