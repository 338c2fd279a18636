"""The Lightning path is as exact as the forge loop, in one process (no Ray): mid-epoch resume
trains the batches the uninterrupted run would, every optimizer step sees whole accumulation
groups, validation runs at the configured optimizer steps, each manifest holds its own step's
metrics, and a run that goes non-finite stops.

``run_lightning`` runs under Ray Train's Lightning environment; here a world of one stands in
for Ray's context (``fake_ray_worker``). Unpadded validation over 2 workers needs real workers:
tests/integration/test_lightning_path.py checks the exact value there.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from forge.checkpoint.serialize import bytes_to_tensors
from forge.checkpoint.store import CheckpointStore
from forge.config.compose import compose
from forge.config.specs import LaunchPlan
from forge.config.validate import to_run_spec
from forge.errors import NonFiniteError

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fake_ray_worker")


class _WorldOfOne:
    def get_world_size(self) -> int:
        return 1

    def get_world_rank(self) -> int:
        return 0

    def get_local_rank(self) -> int:
        return 0

    def get_local_world_size(self) -> int:
        return 1

    def get_node_rank(self) -> int:
        return 0


@pytest.fixture(scope="module")
def process_group_for_the_module():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def fake_ray_worker(monkeypatch: pytest.MonkeyPatch, process_group_for_the_module: None) -> None:
    import ray.train
    import ray.train.torch

    monkeypatch.setattr(ray.train, "get_context", lambda: _WorldOfOne())
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))


def spec_for(storage: Path, *overrides: str):
    return to_run_spec(
        compose(
            [
                "experiment=lightning_digits",
                f"storage.uri={storage}",
                "scaling.num_workers=1",
                "trainer.log_every_n_steps=1",
                "trainer.val_every_n_steps=0",
                "checkpoint.every_n_steps=0",
                "checkpoint.keep_last=null",
                "recipe.params.channels=4",
                *overrides,
            ]
        )
    )


def run(spec, run_uri: Path) -> dict[str, Any]:
    from forge.lightning_runner import run_lightning
    from forge.loop import WorkerContext

    plan = LaunchPlan(run_uri=str(run_uri), config_hash="x", launch_time=time.time())
    return run_lightning(spec, plan, WorkerContext())


def rows(run_uri: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_uri / "metrics.jsonl").read_text().splitlines()]


def weights(run_uri: Path) -> dict[str, torch.Tensor]:
    return bytes_to_tensors(CheckpointStore(str(run_uri)).latest().read("model.safetensors"))


def test_mid_epoch_resume_trains_the_batches_of_the_uninterrupted_run(tmp_path: Path) -> None:
    """23 batches per epoch: 30 steps straight == 10 steps (mid-epoch 0), then resumed to 30,
    crossing into epoch 1. Lightning alone would train batches 0-1 again as steps 11-12."""
    common = ("recipe.params.dropout=0.1",)  # dropout on: the RNG must resume exactly too
    straight = run(spec_for(tmp_path, *common, "trainer.max_steps=30"), tmp_path / "straight")
    run(spec_for(tmp_path, *common, "trainer.max_steps=10"), tmp_path / "resumed")
    resumed = run(spec_for(tmp_path, *common, "trainer.max_steps=30"), tmp_path / "resumed")
    assert straight["step"] == resumed["step"] == 30
    a = [(r["step"], r["train/loss"]) for r in rows(tmp_path / "straight") if "train/loss" in r]
    b = [(r["step"], r["train/loss"]) for r in rows(tmp_path / "resumed") if "train/loss" in r]
    assert [s for s, _ in b] == list(range(1, 31))  # one row per step
    assert [x for _, x in b] == pytest.approx([x for _, x in a], abs=1e-6)
    wa, wb = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6), name
    assert resumed["val/loss"] == pytest.approx(straight["val/loss"], abs=1e-6)


def test_validation_at_optimizer_steps_with_accumulation(tmp_path: Path) -> None:
    """Batch 50 -> 29 batches per epoch, accumulation 2, validation and checkpoints every 5
    steps: validation at steps 5, 10, ..., 30 exactly (Lightning's batch count would drift after
    the first epoch's odd batch), 14 optimizer steps per epoch (the leftover batch is dropped,
    as in the forge loop), and each manifest holds its own step's validation."""
    spec = spec_for(
        tmp_path,
        "recipe.params.batch_size=50",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=30",
        "trainer.val_every_n_steps=5",
        "checkpoint.every_n_steps=5",
    )
    summary = run(spec, tmp_path / "run")
    assert summary["step"] == 30
    all_rows = rows(tmp_path / "run")
    val = {r["step"]: r["val/loss"] for r in all_rows if "val/loss" in r}
    assert sorted(val) == [5, 10, 15, 20, 25, 30]
    epochs = {r["step"]: r["epoch"] for r in all_rows if "train/loss" in r}
    assert epochs[14] == 0 and epochs[15] == 1 and epochs[29] == 2  # 14 steps per epoch
    for ckpt in CheckpointStore(str(tmp_path / "run")).committed():
        assert ckpt.manifest.metrics["val/loss"] == val[ckpt.step], ckpt.step


def test_a_monitor_validates_every_checkpoint_step(tmp_path: Path) -> None:
    spec = spec_for(
        tmp_path,
        "trainer.max_steps=20",
        "trainer.val_every_n_steps=15",
        "checkpoint.every_n_steps=10",
        "checkpoint.monitor=val/accuracy",
        "checkpoint.mode=max",
    )
    summary = run(spec, tmp_path / "run")
    val = {r["step"]: r["val/accuracy"] for r in rows(tmp_path / "run") if "val/accuracy" in r}
    assert sorted(val) == [10, 15, 20]
    committed = CheckpointStore(str(tmp_path / "run")).committed()
    assert {c.step: c.manifest.metrics["val/accuracy"] for c in committed} == {
        10: val[10],
        20: val[20],
    }
    best = max((10, 20), key=lambda s: (val[s], -s))
    assert summary["best_checkpoint"].endswith(f"step_{best:08d}")


def test_without_a_monitor_manifests_carry_no_older_validation(tmp_path: Path) -> None:
    spec = spec_for(
        tmp_path,
        "trainer.max_steps=30",
        "trainer.val_every_n_steps=15",
        "checkpoint.every_n_steps=10",
    )
    run(spec, tmp_path / "run")
    metrics = {
        c.step: c.manifest.metrics for c in CheckpointStore(str(tmp_path / "run")).committed()
    }
    assert metrics[10] == {} and metrics[20] == {}  # step 15's validation is not step 20's
    assert "val/loss" in metrics[30]


def test_a_lightning_run_that_goes_non_finite_stops(tmp_path: Path) -> None:
    spec = spec_for(
        tmp_path, "trainer.max_steps=10", "recipe.params.lr=1e30", "checkpoint.every_n_steps=1"
    )
    """AdamW at lr 1e30: step 1's update leaves NaN weights, the step-1 checkpoint is refused
    (the weights are checked before every checkpoint) and the run stops naming step 1. The
    message does not suggest on_nonfinite=skip, which the Lightning path refuses."""
    with pytest.raises(NonFiniteError, match=r"at step 1: the weights were NaN or inf") as info:
        run(spec, tmp_path / "run")
    assert "on_nonfinite=skip" not in str(info.value)
    assert CheckpointStore(str(tmp_path / "run")).committed() == []
    for ckpt in CheckpointStore(str(tmp_path / "run")).committed():
        w = bytes_to_tensors(ckpt.read("model.safetensors"))
        assert all(torch.isfinite(t).all() for t in w.values()), ckpt.step


def fake_trainer(rank: int, world_size: int, reduce: Any) -> Any:
    """Just the parts of a pl.Trainer that forge.lightning_exact.make_exact changes."""
    from types import SimpleNamespace

    connector = SimpleNamespace(
        _requires_distributed_sampler=lambda dl: True,
        _resolve_sampler=lambda dl, shuffle, mode=None: "lightning's own sampler",
    )
    fit_loop = SimpleNamespace(
        _load_combined_loader_states=lambda: None, epoch_loop=SimpleNamespace()
    )
    return SimpleNamespace(
        _data_connector=connector,
        fit_loop=fit_loop,
        strategy=SimpleNamespace(reduce=reduce),
        distributed_sampler_kwargs={"num_replicas": world_size, "rank": rank},
    )


def test_validation_shards_are_unpadded_and_the_mean_of_counts_is_not_truncated() -> None:
    """359 validation samples on 2 ranks: 180 + 179 distinct samples (no padding to 360), and a
    sync_dist mean of the integer counts is 179.5, not 179 (gloo's mean of ints truncates)."""
    from pytorch_lightning.trainer.states import RunningStage
    from torch.utils.data import DataLoader, TensorDataset

    from forge.lightning_exact import ValidationSchedule, make_exact

    def gloo_mean(tensor, group=None, reduce_op="mean"):
        """Lightning's _sync_ddp mean over 2 ranks whose counts sum to 359: an all-reduce sum,
        then an in-place division (which truncates an integer tensor)."""
        total = torch.full_like(tensor, 359)
        if torch.is_floating_point(tensor):
            return tensor.copy_(total).div_(2)
        return tensor.copy_(total / 2)

    loader = DataLoader(TensorDataset(torch.arange(359)), batch_size=64)
    seen = []
    for rank in (0, 1):
        trainer = fake_trainer(rank, 2, gloo_mean)
        make_exact(trainer, ValidationSchedule())
        sampler = trainer._data_connector._resolve_sampler(loader, False, RunningStage.VALIDATING)
        seen.append(list(sampler))
        assert (
            trainer._data_connector._resolve_sampler(loader, True, RunningStage.TRAINING)
            == "lightning's own sampler"
        )
        counted = trainer.strategy.reduce(torch.tensor(180 if rank == 0 else 179))
        assert float(counted) == 179.5
    assert [len(s) for s in seen] == [180, 179]
    assert sorted(seen[0] + seen[1]) == list(range(359))
