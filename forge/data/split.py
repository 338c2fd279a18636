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


def canonical_columns(frame: pd.DataFrame) -> list[np.ndarray]:
    """Each column as a plain numpy array: numbers (and bools) as float64 with NaN for nulls,
    everything else as an object array of ``str`` with ``""`` for nulls.

    Plain arrays, not a DataFrame: pandas' string inference (``future.infer_string``) must not
    decide how a value hashes.

    Example:
        >>> frame = pd.DataFrame({"a": [1, None], "b": ["x", None]})
        >>> [c.tolist() for c in canonical_columns(frame)]
        [[1.0, nan], ['x', '']]
    """
    out = []
    for name in frame.columns:
        col = frame[name]
        if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            out.append(values + 0.0)  # -0.0 becomes 0.0
        else:
            out.append(
                np.array(
                    ["" if v is None or v is pd.NA or v != v else str(v) for v in col], dtype=object
                )
            )
    return out


def row_hashes(frame: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """A seeded 64-bit hash per row (uint64) of its canonical values."""
    key = hashlib.sha256(str(seed).encode()).hexdigest()[:16]
    combined = np.zeros(len(frame), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for values in canonical_columns(frame):
            # FNV-style mixing of the per-column siphashes (wrapping uint64 arithmetic).
            combined = (combined * np.uint64(0x100000001B3)) ^ pd.util.hash_array(
                values, hash_key=key, categorize=False
            )
    return combined


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
