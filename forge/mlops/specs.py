"""Typed settings of the MLOps verbs (``monitor.*``, ``registry.*``, ``retrain.*``,
``promotion.*``, ``score.*``); library functions take these, never a raw config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forge.config.specs import Spec


class MonitorSpec(Spec):
    """How drift is decided. Defaults follow Evidently's documented ``DataDriftPreset`` defaults
    (p-value tests at 0.05 up to 1,000 rows, normalized Wasserstein / Jensen-Shannon at 0.1
    above, drift share 0.5) and the usual PSI bands (Siddiqi, *Credit Risk Scorecards*, 2006).

    Example:
        >>> MonitorSpec().large_sample_rows
        1000
    """

    alpha: float = Field(0.05, gt=0, lt=1, description="family-wise false-alarm rate")
    large_sample_rows: int = Field(
        1000, gt=0, description="above this many rows (reference and batch), effect sizes"
    )
    wasserstein_threshold: float = Field(0.1, gt=0, description="normalized W1, numeric")
    jensenshannon_threshold: float = Field(0.1, gt=0, description="JS distance, categorical")
    psi_epsilon: float = Field(1e-4, gt=0, lt=1, description="proportion for empty bins")
    psi_threshold: float = Field(0.25, gt=0, description="PSI above which a shift is major")
    multiple_testing: Literal["bonferroni", "drift_share"] = Field(
        "bonferroni",
        description="bonferroni: each test at alpha/m, drift if any fires; "
        "drift_share: features at alpha, drift if their share >= drift_share",
    )
    drift_share: float = Field(0.5, gt=0, le=1)
    max_metric_drop: float = Field(
        0.05, ge=0, description="performance drift: metric drop vs the registered metric"
    )
    metric: str = Field(
        "val/accuracy", description="registered metric compared with accuracy on the batch"
    )
    out: str | None = Field(None, description="report folder; None: in the registry")
    reference_sample_cap: int = Field(
        20_000, gt=100, description="largest reconstructed reference sample"
    )


class RetrainSpec(Spec):
    """When drift turns into a retraining run (see :mod:`forge.mlops.policy`)."""

    windows: int = Field(3, gt=0, description="consecutive drifted batches required")
    cooldown_s: float = Field(3600.0, ge=0, description="seconds since the last retrain")
    min_new_rows: int = Field(1000, ge=0, description="rows seen since the last retrain")
    train: tuple[str, ...] = Field(
        (), description="forge overrides of the retraining run (experiment, data.label, ...)"
    )
    window_source: str | None = Field(
        None, description="data.source of the retraining run: reference + recent data"
    )
    holdout_source: str | None = Field(
        None, description="recent held-out data neither model trained on, for the gate"
    )


class PromotionSpec(Spec):
    """When a challenger replaces the champion."""

    metric: str = Field(
        "accuracy", min_length=1, description="measured on the held-out recent data"
    )
    mode: Literal["max", "min"] = "max"
    min_delta: float = Field(0.005, ge=0, description="required improvement, metric units")


class RegistrySpec(Spec):
    """Where the registry lives; ``uri`` None means ``<storage.uri>/registry``."""

    uri: str | None = None
    mlflow_uri: str | None = None


class ScoreSpec(Spec):
    """Batch scoring: where predictions go, rows per batch, columns carried beside them."""

    out: str | None = None
    batch_size: int = Field(4096, gt=0)
    keys: tuple[str, ...] | None = Field(
        None, description="columns copied beside the predictions; None: every non-feature"
    )
    concurrency: int = Field(2, gt=0, description="scoring actors")
