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


def assert_cluster_idle(timeout_s: float = 60.0) -> None:
    """Every CPU of the shared test cluster is free again (Ray frees an actor's asynchronously)."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"]:
            return
        time.sleep(0.5)
    import psutil

    held = [  # Ray names a worker process after the actor and the task it runs
        " ".join(p.info["cmdline"])
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [""])[0].startswith("ray::")
    ]
    raise AssertionError(f"CPUs still held {timeout_s:.0f} s after the sweep: {held}")


def test_asha_sweep_on_digits(ray_cluster: str, tmp_path: Path) -> None:
    # Kept small for CI's default budget (20 steps, rungs at 5 and 10, 4 trials of 1 worker).
    # Grid order is trial order; with 2 at a time the lr=1e-5 trial meets the good ones' rung
    # results and is one that ASHA stops.
    result = forge.sweep(
        small(
            ray_cluster,
            str(tmp_path),
            "trainer.max_steps=20",
            "trainer.log_every_n_steps=5",
            "trainer.val_every_n_steps=5",
            "checkpoint.every_n_steps=5",
            "sweep=asha",
            "sweep.grace_period=5",
            "sweep.max_concurrent_trials=2",
            "optim.lr=0.2,0.0002,0.1,0.00001",
        )
    )
    assert len(result.trials) == 4
    # A trial ASHA stops takes its whole forge run with it: no Train controller or worker
    # keeps the cluster's CPUs after the sweep returns.
    assert_cluster_idle()
    by_lr = {t["params"]["optim.lr"]: t for t in result.trials}
    assert all(t["status"] == "TERMINATED" for t in result.trials)
    # Which trials ASHA stops depends on the order their rung results arrive (asynchronous
    # halving), so the test asserts what ASHA guarantees: some trial stops at a rung, and
    # some trial (the first to reach each rung is always promoted) trains all 20 steps.
    stopped = [t for t in result.trials if t["stopped_early"]]
    assert stopped and all(t["steps"] < 20 for t in stopped), result.trials
    assert any(t["steps"] == 20 and not t["stopped_early"] for t in by_lr.values())
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
    best_lr = yaml.safe_load((sweep_dir / "best.yaml").read_text())["optim"]["lr"]
    assert best_lr == best["params"]["optim.lr"]


@pytest.mark.slow
def test_pbt_exploit_clones_a_checkpoint_and_uses_its_new_lr(ray_cluster: str, tmp_path: Path):
    result = forge.sweep(
        small(
            ray_cluster,
            str(tmp_path),
            "trainer.max_steps=40",
            "optim.scheduler=constant",
            "sweep=pbt",
            "sweep.perturbation_interval=10",
            "sweep.quantile_fraction=0.5",
            "sweep.seed=0",
            "optim.lr=0.0005,0.3",
        )
    )
    sweep_dir = Path(result.sweep_dir)
    clones = [
        json.loads(p.read_text())
        for p in sweep_dir.glob("trial-*/sweep_trial.json")
        if json.loads(p.read_text())["cloned_from"]
    ]
    assert clones, "no PBT exploit happened"
    for record in clones:
        run = sweep_dir / record["overrides"][-2].split("=", 1)[1]  # run_name=...
        # The exploit started from that committed checkpoint (forge.train refuses any other
        # resume=); the source trial's retention (keep_last) may delete it later.
        resumed = json.loads((run / "resumes.json").read_text())[0]  # its first start
        assert resumed["checkpoint"] == record["cloned_from"]
        assert resumed["changed"]["optim.lr"][1] == pytest.approx(record["values"]["optim.lr"])
        lrs = [r["lr"] for r in read_metrics(str(run / "metrics.jsonl")) if "lr" in r]
        assert lrs and lrs == pytest.approx([record["values"]["optim.lr"]] * len(lrs))
    assert_cluster_idle()  # paused and exploited trials gave their workers back


@pytest.mark.slow
def test_optuna_sweep(ray_cluster: str, tmp_path: Path) -> None:
    result = forge.sweep(
        small(
            ray_cluster,
            str(tmp_path),
            "trainer.max_steps=20",
            "sweep=optuna",
            "sweep.num_samples=3",
            "sweep.seed=0",
            "optim.lr=tag(log,interval(1e-3,0.3))",
            "recipe.params.channels=4,8",
        )
    )
    assert len(result.trials) == 3
    assert all(1e-3 <= t["params"]["optim.lr"] <= 0.3 for t in result.trials)
    assert {t["params"]["recipe.params.channels"] for t in result.trials} <= {4, 8}
    assert result.best_metric is not None and Path(result.files["trials.csv"]).exists()


@pytest.mark.slow
@pytest.mark.s3
def test_sweep_on_s3(ray_cluster: str, s3_bucket: str, s3_server: str, s3_client) -> None:
    uri = f"{s3_bucket}/sweeps"
    result = forge.sweep(
        small(
            ray_cluster,
            uri,
            "storage=s3",
            f"storage.uri={uri}",
            f"storage.endpoint_url={s3_server}",
            "trainer.max_steps=20",
            "seed=0,1",
        )
    )
    assert result.sweep_dir.startswith(uri)
    bucket = s3_bucket.removeprefix("s3://")
    keys = [
        o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="sweeps/")["Contents"]
    ]
    name = result.sweep_dir.rsplit("/", 1)[-1]
    assert f"sweeps/{name}/trials.csv" in keys and f"sweeps/{name}/best.yaml" in keys
    assert any(k.endswith("manifest.json") and "/trial-" in k for k in keys)
    assert any("experiment_state" in k for k in keys)


@pytest.mark.slow
def test_two_workers_per_trial(ray_cluster: str, tmp_path: Path) -> None:
    result = forge.sweep(
        small(
            ray_cluster, str(tmp_path), "scaling.num_workers=2", "trainer.max_steps=20", "seed=0,1"
        )
    )
    assert [t["status"] for t in result.trials] == ["TERMINATED", "TERMINATED"]
    for t in result.trials:
        config = yaml.safe_load((Path(t["run_dir"]) / "config.yaml").read_text())
        assert config["scaling"]["num_workers"] == 2


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(
    ray_cluster: str, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [
        sys.executable,
        "-m",
        "forge",
        "-m",
        *small(
            ray_cluster,
            str(tmp_path),
            "trainer.max_steps=60",
            "sweep.max_concurrent_trials=1",
            "seed=0,1,2",
        ),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and "DONE" not in (tmp_path / "first.log").read_text():
        time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = (tmp_path / "first.log").read_text()
    assert "DONE" in first, first
    (sweep_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("digits-sweep-")]
    finished = {
        p.parent.name: p.stat().st_mtime_ns
        for p in sweep_dir.glob("trial-*/metrics.jsonl")
        if max(r["step"] for r in read_metrics(str(p))) == 60
    }
    assert finished
    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing the sweep" in second.stderr
    rows = list(csv.DictReader((sweep_dir / "trials.csv").open()))
    assert len(rows) == 3 and all(r["steps"] == "60" for r in rows)
    for name, mtime in finished.items():  # a finished trial was not trained again
        assert (sweep_dir / name / "metrics.jsonl").stat().st_mtime_ns == mtime
