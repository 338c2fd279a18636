"""The reference profile of a run's training data: ``data_profile.json`` (``docs/FORMATS.md``).

Built on the driver, one pandas batch at a time (:class:`ProfileBuilder`), so no data is held
whole: per numeric column the moments, quantiles and an equal-frequency histogram whose bin
edges are frozen here; per categorical column the category counts; null rates; the row count;
the label distribution. Monitoring bins new data with :func:`bin_counts` against these edges.

Quantiles are exact (numpy's linear interpolation) while a column has at most
``exact_rows`` values; beyond that they come from a seeded uniform sample of that many values
(reservoir sampling), and the histogram counts come from a second pass over all the data, so
its counts always sum to the column's non-null count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd

FORMAT = "forge.data_profile"
VERSION = 1
PROFILE_FILE = "data_profile.json"
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
DEFAULT_BINS = 10
DEFAULT_EXACT_ROWS = 200_000


def is_numeric(series: pd.Series) -> bool:
    """Numeric columns get quantiles and a histogram; bools and everything else are categorical.

    Example:
        >>> is_numeric(pd.Series([1.0, None])), is_numeric(pd.Series([True])), \
is_numeric(pd.Series(["a"]))
        (True, False, False)
    """
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def bin_counts(values: Any, edges: list[float]) -> list[int]:
    """Counts of ``values`` in the bins of ``edges``, as ``docs/FORMATS.md`` defines them.

    Bin ``i`` is ``[edges[i], edges[i+1])``, the last bin closed; values below ``edges[0]`` go
    to the first bin and above ``edges[-1]`` to the last; NaNs are not counted. A constant
    column has ``edges == [v, v]``: one bin holding every value.

    Example:
        >>> bin_counts([0, 1, 2, 3, 4, 99, -5, float("nan")], [0.0, 2.0, 4.0])
        [3, 4]
    """
    array = np.asarray(values, dtype=np.float64).ravel()
    array = array[~np.isnan(array)]
    n_bins = max(1, len(edges) - 1)
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), array, side="right") - 1
    index = np.clip(index, 0, n_bins - 1)
    return np.bincount(index, minlength=n_bins).astype(int).tolist()


def equal_frequency_edges(values: np.ndarray, bins: int, lo: float, hi: float) -> list[float]:
    """``bins + 1`` edges at the quantiles of ``values``, ``lo``/``hi`` at the ends, duplicates
    merged (so a skewed column may get fewer bins).

    Example:
        >>> equal_frequency_edges(np.arange(9.0), 4, 0.0, 8.0)
        [0.0, 2.0, 4.0, 6.0, 8.0]
        >>> equal_frequency_edges(np.array([3.0, 3.0]), 5, 3.0, 3.0)
        [3.0, 3.0]
    """
    if lo == hi:
        return [float(lo), float(hi)]
    inner = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]) if len(values) else []
    edges = sorted({float(lo), float(hi), *(float(e) for e in inner if lo < e < hi)})
    return edges


def label_keys(series: pd.Series) -> pd.Series:
    """Label values as class keys: integral numbers as ``"1"`` (also when read as float).

    Example:
        >>> label_keys(pd.Series([1.0, 0.0, None])).tolist()
        ['1', '0', None]
    """
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        integral = np.isfinite(values) & (values == np.round(values))
        out = [
            None if np.isnan(v) else (str(int(v)) if ok else str(v))
            for v, ok in zip(values, integral, strict=True)
        ]
        return pd.Series(out, index=series.index, dtype=object)
    return series.map(lambda v: None if v is None or v is pd.NA or v != v else str(v))


class _Numeric:
    def __init__(self, dtype: str, cap: int, rng: np.random.Generator) -> None:
        self.dtype, self.cap, self.rng = dtype, cap, rng
        self.nulls = 0
        self.count = 0  # non-null values
        self.total = 0.0
        self.total_sq = 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.finite = 0
        self.sample: list[np.ndarray] = []
        self.reservoir: np.ndarray | None = None

    def update(self, series: pd.Series) -> None:
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        nan = np.isnan(values)
        self.nulls += int(nan.sum())
        values = values[~nan]
        if not len(values):
            return
        finite = values[np.isfinite(values)]
        if len(finite):
            self.lo = min(self.lo, float(finite.min()))
            self.hi = max(self.hi, float(finite.max()))
            # Shifted sums would be steadier; float64 over at most ~1e9 rows is enough here.
            self.finite += len(finite)
            self.total += float(finite.sum())
            self.total_sq += float(np.square(finite).sum())
        self._sample(values)
        self.count += len(values)

    def _sample(self, values: np.ndarray) -> None:
        seen = self.count  # non-null values before this batch
        if self.reservoir is None:
            room = self.cap - seen
            if len(values) <= room:
                self.sample.append(values)
                return
            self.reservoir = np.concatenate([*self.sample, values[:room]])
            self.sample = []
            values, seen = values[room:], self.cap
        # Algorithm R (Vitter 1985), vectorized: the j-th value seen replaces a random slot with
        # probability cap / j, which keeps a uniform sample of everything seen.
        positions = seen + 1 + np.arange(len(values))
        draws = (self.rng.random(len(values)) * positions).astype(np.int64)
        keep = draws < self.cap
        self.reservoir[draws[keep]] = values[keep]

    @property
    def exact(self) -> bool:
        return self.reservoir is None

    def values(self) -> np.ndarray:
        if self.reservoir is not None:
            return self.reservoir
        return np.concatenate(self.sample) if self.sample else np.empty(0)

    def finish(self, rows: int, bins: int) -> dict[str, Any]:
        values = self.values()
        finite = values[np.isfinite(values)]
        out: dict[str, Any] = {
            "kind": "numeric",
            "dtype": self.dtype,
            "count": self.count,
            "null_fraction": self.nulls / rows if rows else 0.0,
        }
        if not len(finite):
            out.update(mean=None, std=None, min=None, max=None, quantiles={}, histogram=None)
            return out
        n = self.finite
        mean = self.total / max(1, n)
        var = max(0.0, self.total_sq / max(1, n) - mean * mean) * n / max(1, n - 1)
        out.update(mean=mean, std=math.sqrt(var), min=self.lo, max=self.hi)
        out["quantiles"] = {
            str(q): float(v) for q, v in zip(QUANTILES, np.quantile(finite, QUANTILES), strict=True)
        }
        edges = equal_frequency_edges(finite, bins, self.lo, self.hi)
        counts = bin_counts(values, edges) if self.exact else None
        out["histogram"] = {"edges": edges, "counts": counts}
        return out


class _Categorical:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.nulls = 0
        self.counts: dict[str, int] = {}

    def update(self, series: pd.Series) -> None:
        null = series.isna()
        self.nulls += int(null.sum())
        for key, n in series[~null].astype(str).value_counts(sort=False).items():
            self.counts[key] = self.counts.get(key, 0) + int(n)

    def finish(self, rows: int) -> dict[str, Any]:
        return {
            "kind": "categorical",
            "dtype": self.dtype,
            "count": sum(self.counts.values()),
            "null_fraction": self.nulls / rows if rows else 0.0,
            "counts": dict(sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        }


def _dtype_name(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int64"
    if pd.api.types.is_float_dtype(series):
        return "float64"
    if pd.api.types.is_datetime64_any_dtype(series):
        return "datetime"
    return "string"


class ProfileBuilder:
    """Streams pandas batches into a ``data_profile.json`` document.

    Args:
        label: The label column (profiled as ``label_distribution``, not as a feature).
        bins: Histogram bins per numeric column (fewer where quantiles coincide).
        exact_rows: Values per numeric column kept for exact quantiles; beyond it a seeded
            sample is kept and :meth:`finish` needs ``rescan`` for the histogram counts.
        seed: Seed of that sample.

    Example:
        >>> b = ProfileBuilder(label="y")
        >>> b.update(pd.DataFrame({"x": [1.0, 2.0, None, 4.0], "c": ["a", "b", "a", None],
        ...                        "y": [0, 1, 1, 1]}))
        >>> p = b.finish(source="memory", fingerprint="f")
        >>> p["rows"], p["columns"]["x"]["count"], sum(p["columns"]["x"]["histogram"]["counts"])
        (4, 3, 3)
        >>> p["columns"]["c"]["counts"], p["label_distribution"]
        ({'a': 2, 'b': 1}, {'0': 1, '1': 3})
    """

    def __init__(
        self,
        label: str | None = None,
        bins: int = DEFAULT_BINS,
        exact_rows: int = DEFAULT_EXACT_ROWS,
        seed: int = 0,
    ) -> None:
        self.label, self.bins, self.exact_rows = label, bins, exact_rows
        self.rng = np.random.default_rng(seed)
        self.rows = 0
        self.columns: dict[str, _Numeric | _Categorical] = {}
        self.label_counts: dict[str, int] = {}

    def update(self, frame: pd.DataFrame) -> None:
        """Add one batch (the same columns every time)."""
        self.rows += len(frame)
        for name in frame.columns:
            series = frame[name]
            if name == self.label:
                for key, n in label_keys(series).dropna().value_counts(sort=False).items():
                    self.label_counts[key] = self.label_counts.get(key, 0) + int(n)
                continue
            col = self.columns.get(name)
            if col is None:
                col = self.columns[name] = (
                    _Numeric(_dtype_name(series), self.exact_rows, self.rng)
                    if is_numeric(series)
                    else _Categorical(_dtype_name(series))
                )
            col.update(series)

    def finish(
        self,
        *,
        source: str,
        fingerprint: str,
        rescan: Callable[[], Iterable[pd.DataFrame]] | None = None,
    ) -> dict[str, Any]:
        """The profile document.

        Args:
            source: The data's URI, or ``recipe:<name>`` for in-memory data.
            fingerprint: The data fingerprint's sha256 (as in ``run.json``).
            rescan: Yields the same batches again; needed only when a numeric column had more
                than ``exact_rows`` values (histogram counts over all of them).

        Raises:
            ValueError: A second pass is needed and ``rescan`` is None.
        """
        columns = {
            name: col.finish(self.rows, self.bins)
            if isinstance(col, _Numeric)
            else col.finish(self.rows)
            for name, col in self.columns.items()
        }
        pending = {
            name
            for name, doc in columns.items()
            if doc["kind"] == "numeric" and doc["histogram"] and doc["histogram"]["counts"] is None
        }
        if pending:
            if rescan is None:
                raise ValueError(f"columns {sorted(pending)} need a second pass (rescan)")
            totals = {
                n: np.zeros(len(columns[n]["histogram"]["edges"]) - 1 or 1, np.int64)
                for n in pending
            }
            for frame in rescan():
                for name in pending:
                    totals[name] += bin_counts(
                        pd.to_numeric(frame[name], errors="coerce").to_numpy(
                            dtype=np.float64, na_value=np.nan
                        ),
                        columns[name]["histogram"]["edges"],
                    )
            for name in pending:
                columns[name]["histogram"]["counts"] = totals[name].astype(int).tolist()
        return {
            "format": FORMAT,
            "version": VERSION,
            "source": source,
            "fingerprint": fingerprint,
            "rows": self.rows,
            "label": self.label,
            "columns": columns,
            "label_distribution": dict(sorted(self.label_counts.items()))
            if self.label is not None
            else None,
        }


def dumps(profile: dict[str, Any]) -> bytes:
    """The profile as the bytes of ``data_profile.json`` (sorted keys are not used: column
    order is the data's)."""
    return json.dumps(profile, indent=1, allow_nan=False).encode()


def loads(data: bytes) -> dict[str, Any]:
    """Parse ``data_profile.json``, refusing a format or version this forge does not know.

    Raises:
        ValueError: Another format, or a newer version.

    Example:
        >>> loads(b'{"format": "forge.data_profile", "version": 1, "rows": 3}')["rows"]
        3
    """
    doc = json.loads(data)
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError(
            f"not a {FORMAT} version {VERSION} document (format {doc.get('format')!r}, version "
            f"{doc.get('version')!r}); this forge reads only version {VERSION}"
        )
    return doc
