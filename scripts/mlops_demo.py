"""The MLOps loop end to end on CPU, in a few minutes; everything it writes goes under --out.

    python scripts/mlops_demo.py [--out ./mlops-demo]

Stages (each printed as it runs):

1. generate a shop's customer table as Parquet (numeric features, label ``buys``);
2. train ``experiment=tabular`` on it (forge.train), export to ONNX through the parity gate,
   register the export and promote it to ``champion``;
3. score a fresh batch with the champion (``python -m forge score``: Ray Data + onnxruntime);
4. monitor a batch like the reference: no drift (exit code 0);
5. inject a real drift (discounts rise and now drive purchases: a feature shift *and* a new
   label relation) and monitor two such batches with ``on_drift=retrain``
   (``retrain.windows=2``): the first is drift but not yet persistent, the second retrains on
   reference + recent data, exports, registers the challenger, evaluates both models on held-out
   recent rows and promotes the challenger when it wins;
6. score again with the new champion. The drift report's HTML path is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FEATURES = ["visits", "basket_value", "discount_rate", "days_since_last", "session_minutes"]


def customers(rows: int, seed: int, drifted: bool = False) -> pd.DataFrame:
    """A batch of customers; ``drifted``: a discount campaign (discount_rate doubles and
    becomes what drives purchases; basket value matters less)."""
    rng = np.random.default_rng(seed)
    visits = rng.gamma(3.0, 2.0, rows)
    basket = rng.lognormal(3.5, 0.5, rows)
    discount = rng.beta(2, 8, rows) * (2.0 if drifted else 1.0)
    days = rng.exponential(20.0, rows)
    minutes = rng.normal(12.0, 4.0, rows).clip(0.5)
    if drifted:
        logit = -1.0 + 9.0 * (discount - 0.4) + 0.1 * (visits - 6) - 0.02 * (days - 20)
    else:
        logit = (
            0.25 * (visits - 6) + 0.04 * (basket - 37) - 0.05 * (days - 20) + 0.1 * (minutes - 12)
        )
    buys = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return pd.DataFrame(
        {
            "customer_id": np.arange(rows) + seed * 1_000_000,
            "visits": visits,
            "basket_value": basket,
            "discount_rate": discount,
            "days_since_last": days,
            "session_minutes": minutes,
            "buys": buys,
        }
    )


def write(frame: pd.DataFrame, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    frame.to_parquet(os.path.join(folder, "part-00000.parquet"), index=False)
    return folder


def stage(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="./mlops-demo")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray

    from forge.checkpoint.storage import StorageOptions
    from forge.export.core import export
    from forge.export.settings import ExportSettings
    from forge.mlops.cli import monitor_main
    from forge.mlops.registry import Registry
    from forge.mlops.retrain import register_run_export
    from forge.mlops.score import score
    from forge.mlops.specs import ScoreSpec

    started = time.time()
    stage("1. data: reference, a normal batch, two drifted batches, recent held-out rows")
    data = os.path.join(out, "data")
    reference = write(customers(4000, seed=1), f"{data}/reference")
    normal = write(customers(1000, seed=2), f"{data}/batch-normal")
    drifted = [
        write(customers(1000, seed=s, drifted=True), f"{data}/batch-drift-{s}") for s in (3, 4)
    ]
    holdout = write(customers(1000, seed=5, drifted=True), f"{data}/holdout-recent")
    window = f"{data}/window"  # what a retrain trains on: reference + the recent batches
    os.makedirs(window)
    for i, folder in enumerate([reference, *drifted]):
        shutil.copy(f"{folder}/part-00000.parquet", f"{window}/part-{i:05d}.parquet")
    print(f"wrote Parquet under {data}")

    # address="local": its own Ray even when RAY_ADDRESS names another cluster (as forge does)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    options = StorageOptions()
    registry_uri = f"{out}/registry"
    reg = Registry(registry_uri)
    train = [
        "experiment=tabular",
        "data.label=buys",
        f"data.columns=[{','.join(FEATURES)}]",
        "data.val_fraction=0.2",
        f"storage.uri={out}/runs",
        "scaling.num_workers=1",
        f"trainer.max_steps={args.steps}",
        "trainer.val_every_n_steps=100",
        "checkpoint.every_n_steps=100",
        "data.batch_size=64",
        "optim.lr=0.003",
    ]

    stage("2. train the first model, export it (ONNX + parity gate), register as champion")
    import forge

    run = forge.train([*train, f"data.source={reference}"])
    exported = export(run.run_dir, settings=ExportSettings(formats=["onnx"]))
    print(f"export {exported.uri}: {exported.statuses}")
    v1 = register_run_export(
        reg, "shop", exported.uri, run.run_dir, reference, metrics=run.metrics, reason="first model"
    )
    reg.promote("shop", v1.version, "champion", reason="first model")
    print(f"registered {v1} with metrics {v1.metrics}; champion -> v{v1.version}")

    stage("3. score a batch with registry://shop@champion (Ray Data + onnxruntime)")
    scored = score(
        reg.resolve("registry://shop@champion"),
        normal,
        ScoreSpec(out=f"{out}/scores/1", keys=("customer_id",)),
        options,
    )
    print(f"scored {scored['rows']} rows -> {scored['out']}")

    common = ["model=registry://shop@champion", f"registry.uri={registry_uri}"]
    stage("4. monitor a normal batch")
    code = monitor_main([*common, f"data.source={normal}"])
    print(f"monitor exit code {code} (0 = no drift)")

    retrain = [
        "on_drift=retrain",
        "retrain.windows=2",
        "retrain.cooldown_s=0",
        "retrain.min_new_rows=1000",
        f"retrain.window_source={window}",
        f"retrain.holdout_source={holdout}",
        # Quoted: the overrides hold '=' and brackets of their own.
        "retrain.train=[" + ",".join(f"'{t}'" for t in train) + "]",
    ]
    stage("5a. a discount campaign starts: monitor the first drifted batch (on_drift=retrain)")
    code = monitor_main([*common, f"data.source={drifted[0]}", *retrain])
    print(f"monitor exit code {code} (3 = drift); drift must persist 2 batches to retrain")
    stage("5b. the second drifted batch: drift persists -> retrain, export, challenger, gate")
    report = f"{out}/reports/drift-2"
    code = monitor_main([*common, f"data.source={drifted[1]}", f"monitor.out={report}", *retrain])
    print(f"monitor exit code {code}")

    stage("6. score again with the champion now in place")
    champion = reg.resolve("registry://shop@champion")
    scored = score(
        champion, drifted[1], ScoreSpec(out=f"{out}/scores/2", keys=("customer_id",)), options
    )
    print(f"champion is {champion}; scored {scored['rows']} rows -> {scored['out']}")

    stage("audit log")
    for entry in reg.audit("shop"):
        facts = entry.get("metrics") or {}
        numbers = {
            k: facts.get(k)
            for k in ("metric", "challenger", "champion", "delta")
            if isinstance(facts, dict) and k in facts
        }
        print(
            f"{entry['time']} {entry['action']:<20} v{entry.get('version')} "
            f"{entry.get('reason', '')} {numbers or ''}"
        )
    drift = json.load(open(f"{report}/drift.json"))
    print(f"\ndrifted features: {drift['drifted_features']}; reasons: {drift['reasons']}")
    print(f"HTML report: {report}/report.html")
    print(f"done in {time.time() - started:.0f} s; everything is under {out}")
    ray.shutdown()
    return 0 if champion.version != v1.version else 1


if __name__ == "__main__":
    sys.exit(main())
