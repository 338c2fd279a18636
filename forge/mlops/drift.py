"""Drift of a batch against a model's reference profile: per-feature tests, multiple-testing
control, prediction / label / performance drift, and one verdict.

Which test (Evidently's documented ``DataDriftPreset`` defaults, reproduced here with scipy;
Evidently itself does not run on pandas 3):

=========== ============================== =========================================
column      n <= ``large_sample_rows``     n > ``large_sample_rows``
=========== ============================== =========================================
numeric     two-sample Kolmogorov-Smirnov  Wasserstein-1 / reference std  >= 0.1
            (``scipy.stats.ks_2samp``)     (``scipy.stats.wasserstein_distance``)
categorical chi-squared, 2 x k table       Jensen-Shannon distance >= 0.1
            (``scipy.stats.chi2_contingency``) (``scipy.spatial.distance.jensenshannon``)
=========== ============================== =========================================

``n`` is ``min(reference count, batch count)``: a p-value's power grows with both sizes, so the
effect sizes take over only when both are large (Evidently keys on the reference size alone).

Numeric tests compare the batch with a sample reconstructed from the profile's quantiles and
frozen histogram (:func:`forge.mlops.reference.reconstruct_sample`); categorical tests use the
profile's exact counts. Integer-valued numeric columns (every histogram edge and batch value an
integer: counts, ages in years) have point masses that a reconstruction would smear, so they
get the categorical tests on their frozen histogram bins, whose reference counts are exact.

PSI (population stability index, Siddiqi 2006, *Credit Risk Scorecards*, ch. 8) is reported for
every column on the frozen bins (numeric: the profile's histogram edges; categorical: the
reference categories plus one bin for new ones): ``sum((c - r) * ln(c / r))`` over bin
proportions, where an empty bin's proportion is replaced by ``monitor.psi_epsilon`` (1e-4, as
Evidently does). It flags a "major" shift above ``monitor.psi_threshold`` (0.25) but does not
drive the verdict: on small batches its noise (about ``(bins - 1) / n``) is too large.

Multiple testing: with ``monitor.multiple_testing=bonferroni`` (default) each of the ``m``
p-value tests (features, prediction, label) runs at ``alpha / m`` and the batch drifts if any
fires, so the family-wise false-alarm rate is at most ``alpha``. With ``drift_share``, features
are tested at ``alpha`` and the data drifts when at least ``monitor.drift_share`` of them do
(Evidently's rule). Effect-size tests are thresholds, not p-values, and are not corrected.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from forge.mlops.reference import ReferenceProfile, bin_counts, reconstruct_sample
from forge.mlops.specs import MonitorSpec

# Verdict exit codes of ``python -m forge monitor`` (documented in the README).
EXIT_NO_DRIFT = 0
EXIT_DRIFT = 3


@dataclass
class ColumnDrift:
    """The drift result of one column.

    Attributes:
        column: Column name.
        kind: ``numeric`` or ``categorical``.
        test: ``ks``, ``chi2``, ``wasserstein`` or ``jensenshannon``.
        statistic: The test statistic or the distance (normalized Wasserstein in reference
            standard deviations; JS distance in [0, sqrt(ln 2)]).
        p_value: For ``ks``/``chi2``; None for the distances.
        threshold: What the statistic (distance) or the p-value (tests) is compared with.
        drifted: The column's verdict.
        psi: PSI on the frozen bins; ``psi_major`` when above ``monitor.psi_threshold``.
        reference_n / current_n: Non-null values compared.
        bins: Bin labels; ``reference`` / ``current``: proportions per bin (for the plots).
        binned: A numeric column tested on its frozen bins (integer-valued data).
        skipped: Why the column was not tested (no values on one side), else None.
    """

    column: str
    kind: str
    test: str
    statistic: float
    p_value: float | None
    threshold: float
    drifted: bool
    psi: float
    psi_major: bool
    reference_n: int
    current_n: int
    binned: bool = False
    skipped: str | None = None
    reference_null_fraction: float = 0.0
    current_null_fraction: float = 0.0
    bins: list[str] = field(default_factory=list)
    reference: list[float] = field(default_factory=list)
    current: list[float] = field(default_factory=list)


@dataclass
class DriftResult:
    """The verdict on one batch; ``to_json()`` is ``drift.json``.

    Attributes:
        drift: The verdict (exit code 3 when True, 0 when False).
        reasons: Why, in words (empty when no drift).
        features: One :class:`ColumnDrift` per profiled feature.
        prediction / label: Prediction and label drift, when they could be measured.
        performance: ``{"metric", "reference", "current", "drop", "drifted"}`` when the batch
            carries labels and predictions and a reference metric was given.
    """

    drift: bool
    reasons: list[str]
    rows: int
    method: str
    alpha: float
    alpha_per_test: float
    tests: int
    drifted_features: list[str]
    drift_share: float
    features: list[ColumnDrift]
    prediction: ColumnDrift | None = None
    label: ColumnDrift | None = None
    performance: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_DRIFT if self.drift else EXIT_NO_DRIFT

    def to_dict(self) -> dict[str, Any]:
        return {"format": "forge.drift", "version": 1, **asdict(self)}


def psi(reference: np.ndarray, current: np.ndarray, epsilon: float) -> float:
    """Population stability index of two proportion vectors over the same bins.

    ``sum((c - r) * ln(c / r))``, with empty bins set to ``epsilon`` (Siddiqi 2006).

    Example:
        >>> round(psi(np.array([0.5, 0.5]), np.array([0.5, 0.5]), 1e-4), 6)
        0.0
        >>> round(psi(np.array([0.5, 0.5]), np.array([0.9, 0.1]), 1e-4), 4)
        0.8789
    """
    r = np.where(reference > 0, reference, epsilon)
    c = np.where(current > 0, current, epsilon)
    return float(np.sum((c - r) * np.log(c / r)))


def _compare_counts(
    ref_vec: np.ndarray, cur_vec: np.ndarray, large: bool, spec: MonitorSpec, alpha_test: float
) -> tuple[str, float, float | None, float, bool]:
    """Two count vectors over the same bins: chi-squared (small) or JS distance (large).

    Returns ``(test, statistic, p_value, threshold, drifted)``.
    """
    from scipy import stats
    from scipy.spatial import distance

    if large:
        ref_p, cur_p = ref_vec / ref_vec.sum(), cur_vec / cur_vec.sum()
        statistic = float(distance.jensenshannon(ref_p, cur_p))
        threshold = spec.jensenshannon_threshold
        return "jensenshannon", statistic, None, threshold, statistic >= threshold
    table = np.stack([ref_vec, cur_vec])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:  # one bin on both sides: nothing can differ
        return "chi2", 0.0, 1.0, alpha_test, False
    res = stats.chi2_contingency(table)
    p_value = float(res.pvalue)
    return "chi2", float(res.statistic), p_value, alpha_test, p_value < alpha_test


def _is_discrete(ref: Mapping[str, Any], values: np.ndarray) -> bool:
    """Integer-valued on both sides (counts, ages in years, flags): point masses that a
    reconstruction between quantile knots would smear out."""
    edges = np.asarray(ref["histogram"]["edges"], dtype=float)
    return bool(np.all(edges == np.round(edges)) and np.all(values == np.round(values)))


def numeric_drift(
    name: str,
    ref: Mapping[str, Any],
    values: np.ndarray,
    spec: MonitorSpec,
    alpha_test: float,
) -> ColumnDrift:
    """Drift of one numeric column (non-null float values) against its profile entry.

    Continuous columns: KS (small) or normalized Wasserstein (large) against the
    reconstructed reference sample. Integer-valued columns (every histogram edge and every
    batch value an integer): the same tests as categorical columns, on the frozen histogram bins,
    whose reference counts are exact (test names ``chi2``/``jensenshannon``, ``binned``).

    Example:
        >>> ref = {"kind": "numeric", "count": 1000, "mean": 0.5, "std": 0.29, "min": 0.0,
        ...        "max": 1.0, "histogram": {"edges": [0.0, 0.5, 1.0], "counts": [500, 500]}}
        >>> numeric_drift("u", ref, np.linspace(0, 1, 200), MonitorSpec(), 0.05).drifted
        False
        >>> numeric_drift("u", ref, np.linspace(0.5, 1.5, 200), MonitorSpec(), 0.05).drifted
        True
    """
    from scipy import stats

    n_ref = int(ref["count"])
    edges = ref["histogram"]["edges"]
    ref_counts = np.asarray(ref["histogram"]["counts"], dtype=float)
    cur_counts = bin_counts(edges, values).astype(float)
    large = min(n_ref, len(values)) > spec.large_sample_rows
    binned = _is_discrete(ref, values)
    if binned:
        test, statistic, p_value, threshold, drifted = _compare_counts(
            ref_counts, cur_counts, large, spec, alpha_test
        )
    elif large:
        sample = reconstruct_sample(dict(ref), spec.reference_sample_cap)
        std = float(ref["std"])
        w = float(stats.wasserstein_distance(sample, values))
        # A constant reference column: any movement is infinite drift, none is none.
        statistic = w / std if std > 0 else (0.0 if w == 0 else float("inf"))
        test, p_value, threshold = "wasserstein", None, spec.wasserstein_threshold
        drifted = statistic >= threshold
    else:
        sample = reconstruct_sample(dict(ref), spec.reference_sample_cap)
        result = stats.ks_2samp(sample, values)
        statistic, p_value = float(result.statistic), float(result.pvalue)
        test, threshold, drifted = "ks", alpha_test, p_value < alpha_test
    ref_p = ref_counts / max(n_ref, 1)
    cur_p = cur_counts / max(len(values), 1)
    value = psi(ref_p, cur_p, spec.psi_epsilon)
    return ColumnDrift(
        column=name,
        kind="numeric",
        test=test,
        statistic=statistic,
        p_value=p_value,
        threshold=threshold,
        drifted=bool(drifted),
        psi=value,
        psi_major=value > spec.psi_threshold,
        reference_n=n_ref,
        current_n=len(values),
        binned=binned,
        reference_null_fraction=float(ref.get("null_fraction", 0.0)),
        bins=[f"[{lo:.4g}, {hi:.4g})" for lo, hi in zip(edges[:-1], edges[1:], strict=True)],
        reference=ref_p.tolist(),
        current=cur_p.tolist(),
    )


NEW_CATEGORY = "<new>"


def categorical_drift(
    name: str,
    ref_counts: Mapping[str, int],
    values: np.ndarray,
    spec: MonitorSpec,
    alpha_test: float,
) -> ColumnDrift:
    """Drift of one categorical column (non-null values, compared as strings).

    New categories (absent from the reference) are one extra bin, ``<new>``; in the chi-squared
    table they keep their own columns, so a new category is evidence of drift, not an error.

    Example:
        >>> ref = {"a": 500, "b": 500}
        >>> categorical_drift("c", ref, np.array(["a", "b"] * 100), MonitorSpec(), 0.05).drifted
        False
        >>> categorical_drift("c", ref, np.array(["a"] * 180 + ["b"] * 20), MonitorSpec(),
        ...                   0.05).drifted
        True
    """
    cats, cur_counts = np.unique(values.astype(str), return_counts=True)
    current = dict(zip(cats.tolist(), cur_counts.tolist(), strict=True))
    known = list(ref_counts)
    new = sorted(set(current) - set(known))
    ref_vec = np.array([ref_counts[c] for c in known] + [0] * len(new), dtype=float)
    cur_vec = np.array([current.get(c, 0) for c in known + new], dtype=float)
    n_ref, n_cur = int(ref_vec.sum()), int(cur_vec.sum())
    ref_p, cur_p = ref_vec / max(n_ref, 1), cur_vec / max(n_cur, 1)
    large = min(n_ref, n_cur) > spec.large_sample_rows
    test, statistic, p_value, threshold, drifted = _compare_counts(
        ref_vec, cur_vec, large, spec, alpha_test
    )
    # PSI bins: the reference categories plus one for everything new.
    psi_ref = np.append(ref_p[: len(known)], 0.0)
    psi_cur = np.append(cur_p[: len(known)], cur_p[len(known) :].sum())
    value = psi(psi_ref, psi_cur, spec.psi_epsilon)
    return ColumnDrift(
        column=name,
        kind="categorical",
        test=test,
        statistic=statistic,
        p_value=p_value,
        threshold=threshold,
        drifted=bool(drifted),
        psi=value,
        psi_major=value > spec.psi_threshold,
        reference_n=n_ref,
        current_n=n_cur,
        bins=[*known, NEW_CATEGORY],
        reference=psi_ref.tolist(),
        current=psi_cur.tolist(),
    )


def _column_drift(
    name: str, ref: Mapping[str, Any], raw: Any, spec: MonitorSpec, alpha_test: float
) -> ColumnDrift:
    import pandas as pd

    series = pd.Series(raw)
    nulls = float(series.isna().mean()) if len(series) else 0.0
    present = series.dropna()
    ref_n = int(ref.get("count", sum(ref.get("counts", {}).values())))
    if ref_n == 0 or len(present) == 0 or (ref["kind"] == "numeric" and not ref["histogram"]):
        side = "the reference" if ref_n == 0 or not ref.get("histogram", True) else "the batch"
        return ColumnDrift(
            column=name,
            kind=ref["kind"],
            test="none",
            statistic=0.0,
            p_value=None,
            threshold=0.0,
            drifted=False,
            psi=0.0,
            psi_major=False,
            reference_n=ref_n,
            current_n=len(present),
            skipped=f"{side} has no values",
            reference_null_fraction=float(ref.get("null_fraction", 0.0)),
            current_null_fraction=nulls,
        )
    if ref["kind"] == "numeric":
        try:
            values = present.to_numpy(dtype=float)
        except (TypeError, ValueError):
            raise ValueError(
                f"column {name!r} is numeric in the reference profile but the batch holds "
                f"{series.dtype} values that are not numbers; fix the batch or re-profile."
            ) from None
        out = numeric_drift(name, ref, values, spec, alpha_test)
    else:
        out = categorical_drift(name, ref["counts"], present.to_numpy(), spec, alpha_test)
        out.reference_null_fraction = float(ref.get("null_fraction", 0.0))
    out.current_null_fraction = nulls
    return out


def _label_reference(profile: ReferenceProfile) -> dict[str, Any] | None:
    label = profile.label
    if label is None:
        return None
    if label in profile.columns:
        return profile.columns[label]
    dist = profile.raw.get("label_distribution")
    return {"kind": "categorical", "counts": dist} if dist else None


def detect_drift(
    profile: ReferenceProfile,
    batch: Any,
    spec: MonitorSpec | None = None,
    *,
    predictions: Any = None,
    reference_predictions: Mapping[str, Any] | None = None,
    reference_metric: tuple[str, float] | None = None,
) -> DriftResult:
    """Compare a batch with the reference profile and decide.

    Args:
        profile: The model's reference profile (:func:`forge.mlops.reference.load_profile`).
        batch: A pandas DataFrame (or a dict of column -> array) holding every profiled feature;
            the label column too when labels are known.
        spec: Thresholds; defaults to :class:`MonitorSpec`.
        predictions: The model's predictions on ``batch`` (class ids or values), if scored.
        reference_predictions: A profile column entry (``kind`` numeric or categorical) of the
            model's predictions on reference data, for prediction drift.
        reference_metric: ``("val/accuracy", 0.97)``: the registered value; with labels and
            predictions, accuracy on the batch is compared with it (performance drift).

    Returns:
        The :class:`DriftResult`.

    Raises:
        ValueError: The batch lacks profiled features (names them), or a numeric feature holds
            non-numbers.

    Example:
        >>> import pandas as pd
        >>> from forge.mlops.reference import load_profile
        >>> prof = load_profile({"format": "forge.data_profile", "version": 1, "rows": 100,
        ...     "label": None, "columns": {"c": {"kind": "categorical", "count": 100,
        ...     "null_fraction": 0.0, "counts": {"a": 50, "b": 50}}}})
        >>> detect_drift(prof, pd.DataFrame({"c": ["a", "b"] * 50})).drift
        False
    """
    import pandas as pd

    spec = spec or MonitorSpec()
    frame = batch if isinstance(batch, pd.DataFrame) else pd.DataFrame(batch)
    missing = [c for c in profile.features if c not in frame.columns]
    if missing:
        raise ValueError(
            f"the batch lacks {len(missing)} of the model's {len(profile.features)} features: "
            f"{', '.join(map(repr, missing[:10]))}{' ...' if len(missing) > 10 else ''}. "
            "Score and monitor batches with the columns the model was trained on."
        )
    label_ref = _label_reference(profile)
    has_label = label_ref is not None and profile.label in frame.columns
    has_pred = predictions is not None and reference_predictions is not None
    tests = len(profile.features) + int(has_label) + int(has_pred)
    bonferroni = spec.multiple_testing == "bonferroni"
    alpha_test = spec.alpha / tests if bonferroni else spec.alpha

    features = [
        _column_drift(c, profile.columns[c], frame[c], spec, alpha_test) for c in profile.features
    ]
    drifted = [f.column for f in features if f.drifted]
    share = len(drifted) / max(len(features), 1)
    reasons: list[str] = []
    if bonferroni and drifted:
        reasons.append(
            f"{len(drifted)} of {len(features)} features drifted: {', '.join(drifted[:10])}"
        )
    elif not bonferroni and share >= spec.drift_share:
        reasons.append(
            f"{len(drifted)} of {len(features)} features drifted ({share:.0%} >= "
            f"monitor.drift_share={spec.drift_share:.0%}): {', '.join(drifted[:10])}"
        )

    label = None
    if has_label:
        label = _column_drift(profile.label, label_ref, frame[profile.label], spec, alpha_test)
        if label.drifted:
            reasons.append(f"the label distribution drifted ({label.test})")
    prediction = None
    if has_pred:
        prediction = _column_drift(
            "prediction", reference_predictions, np.asarray(predictions), spec, alpha_test
        )
        if prediction.drifted:
            reasons.append(f"the prediction distribution drifted ({prediction.test})")
    performance = None
    if predictions is not None and has_label and reference_metric is not None:
        name, ref_value = reference_metric
        y = frame[profile.label].to_numpy()
        current = float(np.mean(np.asarray(predictions).astype(str) == y.astype(str)))
        drop = ref_value - current
        performance = {
            "metric": name,
            "reference": ref_value,
            "current": current,
            "drop": drop,
            "max_drop": spec.max_metric_drop,
            "drifted": drop > spec.max_metric_drop,
        }
        if performance["drifted"]:
            reasons.append(
                f"accuracy on the batch is {current:.4f}, {drop:.4f} below the registered "
                f"{name}={ref_value:.4f} (monitor.max_metric_drop={spec.max_metric_drop})"
            )
    return DriftResult(
        drift=bool(reasons),
        reasons=reasons,
        rows=len(frame),
        method=spec.multiple_testing,
        alpha=spec.alpha,
        alpha_per_test=alpha_test,
        tests=tests,
        drifted_features=drifted,
        drift_share=share,
        features=features,
        prediction=prediction,
        label=label,
        performance=performance,
        settings=spec.model_dump(),
    )
