"""Sweeps on the shared Ray test cluster: every trial a full forge run, reported to Tune.

The default set has one key end-to-end test (ASHA on digits, 4 trials of 1 worker); the rest
(PBT, Optuna, S3, resume after a driver kill, 2 workers per trial) are marked slow.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

import forge
from forge.config.compose import compose
from forge.metrics import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]


def small(address: str, storage: str, *extra: str) -> list[str]:
    return [
        "experiment=digits",
        f"ray.address={address}",
        f"storage.uri={storage}",
        "scaling.num_workers=1",
        "recipe.params.channels=4",
        "trainer.max_steps=30",
        "trainer.log_every_n_steps=10",
        "trainer.val_every_n_steps=10",
        "checkpoint.every_n_steps=10",
        "optim=sgd",
        *extra,
    ]


def test_asha_sweep_on_digits(ray_cluster: str, tmp_path: Path) -> None:
    # Grid order is trial order; with 2 at a time the lr=1e-4 trials meet the good ones' rung
    # results and are the ones ASHA stops.
    result = forge.sweep(
        small(
            ray_cluster,
            str(tmp_path),
            "sweep=asha",
            "sweep.grace_period=10",
            "sweep.max_concurrent_trials=2",
            "optim.lr=0.2,0.0002,0.1,0.0001",
        )
    )
    assert len(result.trials) == 4
    by_lr = {t["params"]["optim.lr"]: t for t in result.trials}
    assert all(t["status"] == "TERMINATED" for t in result.trials)
    assert any(t["stopped_early"] for t in result.trials), result.trials
    assert by_lr[0.2]["steps"] == 30 and not by_lr[0.2]["stopped_early"]
    assert by_lr[0.0001]["stopped_early"] and by_lr[0.0001]["steps"] < 30
    sweep_dir = Path(result.sweep_dir)
    assert sweep_dir.parent == tmp_path
    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    assert len(rows) == 4 and {"optim.lr", "best_val/loss", "run_dir", "best_checkpoint"} <= set(
        rows[0]
    )
    assert (sweep_dir / "plots" / "metric_vs_step.png").stat().st_size > 1000
    assert (sweep_dir / "plots" / "metric_vs_optim_lr.png").exists()
    manifest = json.loads((sweep_dir / "results_manifest.json").read_text())
    assert "best.yaml" in manifest["files"]
    # every trial is a forge run folder named after its trial id, with committed checkpoints
    for t in result.trials:
        run = Path(t["run_dir"])
        assert run.name == f"trial-{t['trial_id']}" and run.parent == sweep_dir
        assert json.loads((run / "sweep_trial.json").read_text())["trial_id"] == t["trial_id"]
        assert t["best_checkpoint"] and Path(t["best_checkpoint"], "manifest.json").exists()

    # best.yaml, used as an experiment file, reproduces the best trial's metric
    best = min(result.trials, key=lambda t: t["best_val/loss"])
    assert result.best_metric == best["best_val/loss"]
    exp = tmp_path / "cfg" / "experiment"
    exp.mkdir(parents=True)
    (exp / "best.yaml").write_text((sweep_dir / "best.yaml").read_text())
    cfg = compose(
        [
            "experiment=best",
            f"hydra.searchpath=[file://{tmp_path / 'cfg'}]",
            f"ray.address={ray_cluster}",
            f"storage.uri={tmp_path / 'rerun'}",
        ]
    )
    rerun = forge.train(cfg)
    trial_rows = read_metrics(str(Path(best["run_dir"]) / "metrics.jsonl"))
    rerun_rows = read_metrics(str(Path(rerun.run_dir) / "metrics.jsonl"))

    def val_losses(rows):
        return {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}

    assert val_losses(rerun_rows) == pytest.approx(val_losses(trial_rows), rel=1e-5)
    assert min(val_losses(rerun_rows).values()) == pytest.approx(result.best_metric, rel=1e-5)
    assert yaml.safe_load((sweep_dir / "best.yaml").read_text())["optim"]["lr"] == 0.2
