"""Benchmark a file source through Ray Data against the same rows from memory, and the contract
check's throughput.

1. **Ingest.** The ``tabular`` MLP on 2 CPU workers (DDP over gloo), batch 256 per worker, the
   same steps, one local Ray cluster for both runs:

   * forge with ``data.source=<Parquet folder>``: Ray Data reads the files, Ray Train shards
     them, each worker streams its shard through a seeded local shuffle buffer;
   * the baseline: the same rows, read and encoded once into tensors by a recipe
     (``_memory_tabular.py``) and fed by forge's in-memory ``DataLoader`` path, same model.

   Reports the median step time after 20 warm-up steps (rank 0) and the ratio;
   target Ray Data ÷ memory <= **1.2** (ingest must not be the bottleneck).

2. **Contract check.** ``ContractChecker`` (pandera per-row checks plus forge's table checks)
   over 1,000,000 rows x 20 columns (12 numeric, 8 categorical; a range and null rule on each
   numeric, categories on each text column, one unique id) in 64k-row batches, against the
   baseline of one ``pandera`` ``DataFrameSchema.validate(lazy=True)`` of the same rules on the
   whole frame at once. Reports rows/s of each.

Run it::

    python scripts/bench/data_ingest.py                 # both parts
    python scripts/bench/data_ingest.py --only contract # no Ray
    python scripts/bench/data_ingest.py --rows 200000 --steps 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))
TARGET_RATIO = 1.2
COLUMNS = "[age,income,debt_ratio,accounts,tenure_years,region,plan,channel]"


def ingest(rows: int, steps: int, repeats: int) -> None:
    import logging

    import ray
    from make_tabular_data import write

    import forge

    data = tempfile.mkdtemp(prefix="forge-bench-data-")
    write(data, rows=rows, shards=8)
    runs = tempfile.mkdtemp(prefix="forge-bench-runs-")
    # Logical CPUs: 2 for the workers plus one for Ray Data's tasks (forge refuses a file
    # source that leaves Ray Data none), also on a 2-core machine.
    cpus = max(3, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, logging_level=logging.WARNING, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    common = [
        f"ray.address={address}",
        f"storage.uri={runs}",
        "experiment=tabular",
        "data.batch_size=256",
        f"trainer.max_steps={steps}",
        "trainer.val_every_n_steps=0",
        "checkpoint.every_n_steps=0",
        "checkpoint.monitor=null",  # no validation data on either side
        "scaling.num_workers=2",
    ]
    sides = {
        "ray data": [f"data.source={data}", "data.label=default", f"data.columns={COLUMNS}"],
        "memory": [
            f"recipe.module={REPO_ROOT / 'scripts/bench/_memory_tabular.py'}",
            "recipe.name=memory_tabular",
            "~recipe.params",
            f"+recipe.params={{source: '{data}', columns: {COLUMNS}}}",
        ],
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    try:
        for round_ in range(repeats):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for name in order:
                result = forge.train([*common, *sides[name]])
                times[name].append(result.step_time_s)
                print(f"  {name}: step {result.step_time_s * 1000:.1f} ms", flush=True)
    finally:
        ray.shutdown()
    ray_data, memory = (statistics.median(times[n]) for n in ("ray data", "memory"))
    ratio = ray_data / memory
    print(
        f"\ningest: tabular MLP, 2 workers, batch 256, {steps} steps, {rows} rows (median of "
        f"{repeats})"
    )
    print(f"  Ray Data step  {ray_data * 1000:8.2f} ms")
    print(f"  memory step    {memory * 1000:8.2f} ms")
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    print(f"  ratio          {ratio:8.3f}  ({verdict} target <= {TARGET_RATIO})")


def contract(rows: int) -> None:
    import numpy as np
    import pandas as pd
    import pandera.pandas as pa

    from forge.data.contract import ContractChecker, load_contract

    rng = np.random.default_rng(0)
    frame = {"id": np.arange(rows, dtype=np.int64)}
    rules: dict = {"id": {"dtype": "int", "unique": True}}
    for i in range(11):
        values = rng.normal(50, 10, rows)
        values[rng.random(rows) < 0.01] = np.nan
        frame[f"n{i}"] = values
        rules[f"n{i}"] = {"dtype": "float", "min": 0, "max": 100, "max_null_fraction": 0.05}
    for i in range(8):
        frame[f"c{i}"] = rng.choice(["a", "b", "c", "d", "e"], rows)
        rules[f"c{i}"] = {"dtype": "string", "categories": ["a", "b", "c", "d", "e"]}
    frame = pd.DataFrame(frame)
    checker = ContractChecker(load_contract({"columns": rules, "table": {"min_rows": 1}}))
    start = time.perf_counter()
    for begin in range(0, rows, 65_536):
        checker.update(frame.iloc[begin : begin + 65_536])
    violations = checker.finish()
    forge_s = time.perf_counter() - start

    schema = pa.DataFrameSchema(
        {
            "id": pa.Column(int, unique=True),
            **{
                f"n{i}": pa.Column(float, [pa.Check.ge(0), pa.Check.le(100)], nullable=True)
                for i in range(11)
            },
            **{f"c{i}": pa.Column(str, pa.Check.isin(list("abcde"))) for i in range(8)},
        }
    )
    start = time.perf_counter()
    try:
        schema.validate(frame, lazy=True)
    except pa.errors.SchemaErrors:
        pass
    pandera_s = time.perf_counter() - start
    print(
        f"\ncontract check: {rows} rows x {frame.shape[1]} columns ({len(violations)} violations)"
    )
    print(f"  forge ContractChecker (64k batches)  {rows / forge_s:12,.0f} rows/s")
    print(f"  pandera validate, whole frame        {rows / pandera_s:12,.0f} rows/s")
    print(f"  ratio forge / pandera                {pandera_s / forge_s:12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["both", "ingest", "contract"], default="both")
    parser.add_argument("--rows", type=int, default=200_000, help="ingest: rows of the dataset")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--contract-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    if args.only in ("both", "contract"):
        contract(args.contract_rows)
    if args.only in ("both", "ingest"):
        ingest(args.rows, args.steps, args.repeats)


if __name__ == "__main__":
    main()
