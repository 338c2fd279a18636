"""Write a realistic tabular dataset as Parquet (or CSV) shards, generated locally.

A loan-default-like table: numeric columns (age, income, debt ratio, ...) with some nulls,
categorical columns (region, plan, channel), an integer id, and a binary label ``default`` that
depends on several of them (so a model has something to learn; about 20% positives).

    python scripts/make_tabular_data.py data/loans --rows 300000 --shards 8
    python -m forge experiment=tabular data.source=data/loans data.label=default \
        data.val_fraction=0.1

Small by default (20,000 rows, 4 shards) so tests stay fast.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd

REGIONS = ["north", "south", "east", "west", "center"]
PLANS = ["basic", "plus", "premium"]
CHANNELS = ["web", "branch", "partner", "phone"]


def make_frame(rows: int, seed: int = 0, start_id: int = 0) -> pd.DataFrame:
    """``rows`` rows of the dataset (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    age = rng.normal(42, 12, rows).clip(18, 90).round()
    income = rng.lognormal(10.6, 0.5, rows).round(2)
    debt_ratio = rng.beta(2, 5, rows)
    accounts = rng.poisson(3, rows)
    tenure = rng.exponential(5, rows).round(1)
    region = rng.choice(REGIONS, rows, p=[0.25, 0.2, 0.2, 0.2, 0.15])
    plan = rng.choice(PLANS, rows, p=[0.6, 0.3, 0.1])
    channel = rng.choice(CHANNELS, rows)
    score = (
        -1.8
        + 3.0 * (debt_ratio - 0.3)
        - 0.6 * (np.log(income) - 10.6)
        - 0.02 * (age - 42)
        + 0.15 * accounts
        + np.where(plan == "basic", 0.4, -0.2)
        + np.where(region == "south", 0.3, 0.0)
        + rng.normal(0, 0.5, rows)
    )
    default = (rng.random(rows) < 1 / (1 + np.exp(-score))).astype(np.int64)
    frame = pd.DataFrame(
        {
            "id": np.arange(start_id, start_id + rows, dtype=np.int64),
            "age": age,
            "income": income,
            "debt_ratio": debt_ratio,
            "accounts": accounts.astype(np.int64),
            "tenure_years": tenure,
            "region": region,
            "plan": plan,
            "channel": channel,
            "default": default,
        }
    )
    # Realistic gaps: income and tenure are missing for some customers, channel for a few.
    for name, share in (("income", 0.03), ("tenure_years", 0.05), ("channel", 0.01)):
        frame.loc[rng.random(rows) < share, name] = None
    return frame


def write(out: str, rows: int, shards: int, seed: int = 0, fmt: str = "parquet") -> list[str]:
    """Write ``rows`` rows as ``shards`` files under ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = []
    per = -(-rows // shards)
    for i in range(shards):
        n = min(per, rows - i * per)
        if n <= 0:
            break
        frame = make_frame(n, seed=seed * 1000 + i, start_id=i * per)
        path = os.path.join(out, f"part-{i:05d}.{fmt}")
        if fmt == "parquet":
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    args = parser.parse_args()
    paths = write(args.out, args.rows, args.shards, args.seed, args.format)
    print(f"wrote {args.rows} rows in {len(paths)} {args.format} file(s) under {args.out}")


if __name__ == "__main__":
    main()
