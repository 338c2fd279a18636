"""forge sweep vs a bare Ray Tune + TorchTrainer sweep of the same digits trials; ratios printed.

1. Overhead: ``--trials`` digits trials (``--steps`` steps, 1 worker, 2 concurrent) through
   ``forge.sweep`` against a bare ``Tuner`` whose driver function runs a plain ``TorchTrainer``
   loop of the same model, data, optimizer and steps, validating, checkpointing and reporting
   at the same five steps as forge (what ASHA/PBT need from either). Wall-time ratio
   (target <= 1.10).
2. Value: ASHA against the basic sweeper with the same trials (same shuffled lr order) on
   digits: optimizer steps consumed by all trials together until the first validation with
   val/accuracy >= 0.95 (from the trials' metrics.jsonl timestamps); ratio ASHA / basic
   (target <= 0.6).

    python scripts/bench/sweep_overhead.py                 # both, embedded Ray with 4 CPUs
    python scripts/bench/sweep_overhead.py --only overhead --trials 8 --steps 50
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LRS = [0.3, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001, 0.00005]


def bare_worker(config: dict) -> None:
    """What a Tune user writes by hand: train, and every ``every`` steps validate, save a
    checkpoint and report both (the same cadence forge validates and commits at below)."""
    import os

    import ray.train
    import torch
    from torch.utils.data import DataLoader

    from recipes.digits import DigitsCNN, load_digits_tensors

    torch.manual_seed(0)
    torch.set_num_threads(1)
    train, val = load_digits_tensors(0.2, 0)
    model = DigitsCNN(16, 0.1)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    loader = DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    every = max(1, config["steps"] // 5)
    step = 0
    while step < config["steps"]:
        for x, y in loader:
            model.train()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % every == 0 or step == config["steps"]:
                model.eval()
                with torch.no_grad():
                    vx, vy = val.tensors
                    logits = model(vx)
                    metrics = {
                        "step": step,
                        "val/loss": torch.nn.functional.cross_entropy(logits, vy).item(),
                        "val/accuracy": (logits.argmax(1) == vy).float().mean().item(),
                    }
                with tempfile.TemporaryDirectory() as folder:
                    torch.save(
                        {"model": model.state_dict(), "optim": opt.state_dict(), "step": step},
                        os.path.join(folder, "state.pt"),
                    )
                    ray.train.report(
                        metrics, checkpoint=ray.train.Checkpoint.from_directory(folder)
                    )
            if step >= config["steps"]:
                break


def bare_driver(config: dict) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        bare_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        # Ray's documented Train-in-Tune pattern: every worker report reaches Tune.
        run_config=ray.train.RunConfig(
            storage_path=tempfile.mkdtemp(), callbacks=[TuneReportCallback()]
        ),
    )
    trainer.fit()


def run_bare(trials: int, steps: int) -> float:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    start = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(bare_driver, {"cpu": 0, "memory": 1}),
        param_space={"lr": tune.grid_search(LRS[:trials]), "steps": steps},
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=2)),
        run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(), verbose=0),
    )
    tuner.fit()
    return time.perf_counter() - start


def steps_until(trials: list[dict], threshold: float = 0.95) -> int | None:
    """Steps all trials had consumed when a first one validated at ``val/accuracy >= threshold``.

    Merges every trial's ``metrics.jsonl`` rows on their wall-clock ``time``; steps consumed at
    time T = sum over trials of the highest step logged by T. None if no trial got there.
    """
    from forge.metrics import read_metrics

    events = []
    for i, t in enumerate(trials):
        for row in read_metrics(str(Path(t["run_dir"]) / "metrics.jsonl")):
            events.append((row["time"], i, int(row["step"]), row.get("val/accuracy")))
    events.sort(key=lambda e: (e[0], e[2]))
    latest: dict[int, int] = {}
    for _, i, step, acc in events:
        latest[i] = max(latest.get(i, 0), step)
        if acc is not None and acc >= threshold:
            return sum(latest.values())
    return None


def forge_overrides(root: str, trials: int, steps: int, *extra: str) -> list[str]:
    import random

    order = LRS[:trials]
    random.Random(0).shuffle(order)  # same order for both schedulers; not best-first
    lrs = ",".join(repr(x) for x in order)
    return [
        "experiment=digits",
        "ray.address=auto",
        f"storage.uri={root}",
        "scaling.num_workers=1",
        "optim=sgd",
        f"trainer.max_steps={steps}",
        f"trainer.val_every_n_steps={max(1, steps // 5)}",
        f"checkpoint.every_n_steps={max(1, steps // 5)}",
        "sweep.max_concurrent_trials=2",
        f"optim.lr={lrs}",
        *extra,
    ]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--value-steps", type=int, default=200)
    parser.add_argument("--only", choices=["both", "overhead", "value"], default="both")
    args = parser.parse_args()

    import ray

    import forge

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    if args.only in ("both", "overhead"):
        bare = run_bare(args.trials, args.steps)
        start = time.perf_counter()
        forge.sweep(forge_overrides(tempfile.mkdtemp(), args.trials, args.steps))
        ours = time.perf_counter() - start
        print(
            f"| sweep of {args.trials} trials x {args.steps} steps | bare Tune+TorchTrainer "
            f"{bare:.1f} s | forge.sweep {ours:.1f} s | ratio {ours / bare:.2f} (target <= 1.10) |"
        )
    if args.only in ("both", "value"):
        used = {}
        for name in ("basic", "asha"):
            extra = [f"sweep={name}"] + (
                [f"sweep.grace_period={max(1, args.value_steps // 5)}"] if name == "asha" else []
            )
            result = forge.sweep(
                forge_overrides(
                    tempfile.mkdtemp(),
                    args.trials,
                    args.value_steps,
                    *extra,
                    "sweep.metric=val/accuracy",
                    "sweep.mode=max",
                )
            )
            best = result.best_metric or 0.0
            used[name] = (steps_until(result.trials), sum(t["steps"] for t in result.trials), best)
        (b_until, b_total, b_best), (a_until, a_total, a_best) = used["basic"], used["asha"]
        ratio = f"{a_until / b_until:.2f}" if a_until and b_until else "n/a (0.95 not reached)"
        print(
            f"| steps until val/accuracy >= 0.95 | basic {b_until} (total {b_total}, best acc "
            f"{b_best:.3f}) | asha {a_until} (total {a_total}, best acc {a_best:.3f}) | "
            f"ratio {ratio} (target <= 0.6) |"
        )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
