"""The train/validation split of a file source: a seeded hash, so it needs no row order.

A row goes to validation when the hash of its ``data.split_key`` value (or, without a key, of
all its values) maps below ``data.val_fraction``. The same row lands on the same side in every
process, batch and run (for a given seed), and duplicate rows never straddle the split. Values
are hashed in a canonical form (numbers as float64, everything else as text), so a batch whose
integer column was read as float (because it held a null) hashes the same.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """Numbers (and bools) as float64, everything else as text; nulls as NaN / empty text.

    Example:
        >>> canonical(pd.DataFrame({"a": [1, None], "b": ["x", None]}))["b"].tolist()
        ['x', '']
    """
    out = {}
    for name in frame.columns:
        col = frame[name]
        if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            out[name] = pd.to_numeric(col, errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
        else:
            out[name] = np.array(
                ["" if v is None or v is pd.NA or v != v else str(v) for v in col], dtype=object
            )
    return pd.DataFrame(out, index=frame.index)


def row_hashes(frame: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """A seeded 64-bit hash per row (uint64) of its canonical values."""
    key = hashlib.sha256(str(seed).encode()).hexdigest()[:16]
    return pd.util.hash_pandas_object(canonical(frame), index=False, hash_key=key).to_numpy(
        dtype=np.uint64
    )


def val_mask(
    frame: pd.DataFrame, fraction: float, key: str | None = None, seed: int = 0
) -> np.ndarray:
    """True for the rows of ``frame`` that belong to the validation split.

    Example:
        >>> frame = pd.DataFrame({"id": range(10_000)})
        >>> mask = val_mask(frame, 0.2, "id", seed=3)
        >>> same = (mask == val_mask(frame[::-1], 0.2, "id", 3)[::-1]).all()
        >>> float(round(mask.mean(), 2)), bool(same)
        (0.2, True)
    """
    if fraction <= 0:
        return np.zeros(len(frame), dtype=bool)
    hashes = row_hashes(frame[[key]] if key else frame, seed)
    uniform = (hashes >> np.uint64(11)).astype(np.float64) / float(2**53)  # in [0, 1)
    return uniform < fraction
