"""forge.train end to end on the shared local Ray cluster: recipes, resume, failures, refusals."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import forge
from forge.errors import ClusterError

pytestmark = pytest.mark.ray

FAST = ["trainer.log_every_n_steps=5", "data.batch_size=16"]


def overrides(ray_cluster: str, tmp_path: Path, *extra: str) -> list[str]:
    return [f"ray.address={ray_cluster}", f"storage.uri={tmp_path}", *FAST, *extra]


@pytest.mark.parametrize(
    "experiment,extra",
    [
        # 2 CPUs per worker, 2 CPUs per node: Ray must put one worker on each raylet.
        ("digits", ["scaling.cpus_per_worker=2"]),
        ("tabular", []),
        (
            "tinylm",
            [
                "recipe.params.max_files=3",
                "recipe.params.n_layer=1",
                "recipe.params.n_embd=32",
                "recipe.params.block_size=32",
            ],
        ),
    ],
)
def test_every_recipe_trains_with_two_workers(
    ray_cluster, tmp_path, quiet_console, experiment, extra
):
    result = forge.train(
        overrides(
            ray_cluster,
            tmp_path,
            f"experiment={experiment}",
            "trainer.max_steps=10",
            "checkpoint.every_n_steps=5",
            "trainer.val_every_n_steps=5",
            *extra,
        ),
        console=quiet_console,
    )
    assert result.global_step == 10
    assert "val/loss" in result.metrics
    manifest = json.loads(Path(result.last_checkpoint, "manifest.json").read_text())
    assert manifest["step"] == 10 and manifest["world_size"] == 2
    run = Path(result.run_dir)
    for name in ("config.yaml", "overrides.txt", "run.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and info["versions"]["torch"]
    assert "Training finished" in quiet_console.file.getvalue()


def test_resume_continues_from_the_saved_step(ray_cluster, tmp_path, quiet_console):
    base = overrides(
        ray_cluster,
        tmp_path,
        "run_name=resumable",
        "checkpoint.every_n_steps=10",
        "trainer.val_every_n_steps=0",
    )
    first = forge.train([*base, "trainer.max_steps=10"], console=quiet_console)
    assert first.global_step == 10
    second = forge.train([*base, "trainer.max_steps=20", "resume=auto"], console=quiet_console)
    assert second.global_step == 20
    assert "resumed from" in quiet_console.file.getvalue()
    rows = [
        json.loads(line) for line in Path(second.run_dir, "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == sorted(steps) and steps.count(10) == 1  # no replay of steps 1..10


def _train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (their process title names the actor)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::RayTrainWorker"):
            pids.append(proc.info["pid"])
    return pids


def test_worker_killed_with_sigkill_is_recovered(ray_cluster, tmp_path, quiet_console):
    args = overrides(
        ray_cluster,
        tmp_path,
        "run_name=killed",
        "trainer.max_steps=200",
        "checkpoint.every_n_steps=20",
        "trainer.val_every_n_steps=0",
        "trainer.max_failures=2",
    )
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = forge.train(args, console=quiet_console)
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    pointer = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 180
    while not pointer.exists() and time.time() < deadline and thread.is_alive():
        time.sleep(0.2)
    assert pointer.exists(), "no checkpoint was committed before the deadline"
    workers = _train_worker_pids()
    assert workers, "no live Ray Train worker to kill"
    os.kill(workers[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.global_step == 200
    assert "resumed from" in quiet_console.file.getvalue()


def test_gpu_request_on_cpu_cluster_is_refused(ray_cluster, tmp_path):
    with pytest.raises(ClusterError, match=r"no GPUs.*scaling.use_gpu=false"):
        forge.train(overrides(ray_cluster, tmp_path, "scaling.use_gpu=true"))
    assert not any(tmp_path.iterdir()) or not any(tmp_path.rglob("metrics.jsonl"))


def test_more_workers_than_the_cluster_can_place_is_refused(ray_cluster, tmp_path):
    with pytest.raises(ClusterError, match=r"scaling.num_workers=9 .*can place 4"):
        forge.train(overrides(ray_cluster, tmp_path, "scaling.num_workers=9"))


def test_worker_error_is_one_paragraph_and_not_retried(ray_cluster, tmp_path, quiet_console):
    # A recipe parameter that only fails when the worker builds the model: a restart would
    # fail the same way, so the run ends at once with the recipe's own error.
    with pytest.raises(forge.ForgeError) as info:
        forge.train(
            overrides(ray_cluster, tmp_path, "recipe.params.channels=0", "trainer.max_steps=2"),
            console=quiet_console,
        )
    message = str(info.value)
    assert "Training failed on a worker" in message and "Traceback" not in message
    assert "restart" not in quiet_console.file.getvalue()
