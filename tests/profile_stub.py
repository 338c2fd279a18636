"""A stand-in profiler for the mlops tests: builds a ``data_profile.json`` dict exactly as
docs/FORMATS.md describes it (10 equal-frequency bins from the quantiles, duplicates merged).

Test-only: forge's profiler is forge.data's (issue 13); this keeps the mlops tests independent
of it.
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
