"""Numbers the README promises: the LR schedule and warm-up (exact values, as logged by a run),
a bf16 run on CPU, and run.json's git sha and dirty flag."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch

from forge.checkpoint.serialize import bytes_to_tensors
from forge.checkpoint.store import CheckpointStore
from forge.config.compose import compose
from forge.config.specs import LaunchPlan, OptimSpec
from forge.config.validate import to_run_spec
from forge.loop import WorkerContext, run_loop
from forge.optim import make_scheduler
from forge.run_folder import git_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lrs_of(spec: OptimSpec, total: int) -> list[float]:
    """The learning rate each optimizer step 1..total uses."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec.lr)
    sched = make_scheduler(spec, opt, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_min_lr() -> None:
    """lr 1.0, 4 warm-up steps (lr x 1/4, 2/4, 3/4, 1), then cosine from the peak over the
    remaining 6 steps towards 0.1 (min_lr_ratio), which the schedule reaches at max_steps."""
    spec = OptimSpec(lr=1.0, warmup_steps=4, scheduler="cosine", min_lr_ratio=0.1)

    def cosine(i: int) -> float:  # i steps into the decay, of 6
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 6))

    expected = [0.25, 0.5, 0.75, 1.0] + [cosine(i) for i in range(6)]
    assert lrs_of(spec, 10) == pytest.approx(expected, abs=1e-12)
    # the same numbers written out: 0.1 + 0.45 (1 + cos(pi i / 6))
    assert expected[4:] == pytest.approx([1.0, 0.9397114, 0.775, 0.55, 0.325, 0.1602886])


def test_linear_and_constant_schedules() -> None:
    linear = OptimSpec(lr=2.0, warmup_steps=2, scheduler="linear", min_lr_ratio=0.0)
    # warm-up 1.0, 2.0; then 2 * (1 - i/8) for i = 0..7 steps into the decay
    assert lrs_of(linear, 10) == pytest.approx(
        [1.0, 2.0, 2.0, 1.75, 1.5, 1.25, 1.0, 0.75, 0.5, 0.25], abs=1e-12
    )
    constant = OptimSpec(lr=0.3, warmup_steps=3, scheduler="constant")
    assert lrs_of(constant, 6) == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3, 0.3], abs=1e-12)


def digits_spec(storage: Path, *overrides: str):
    return to_run_spec(
        compose(
            [
                "experiment=digits",
                f"storage.uri={storage}",
                "trainer.max_steps=10",
                "trainer.log_every_n_steps=1",
                "trainer.val_every_n_steps=0",
                "checkpoint.every_n_steps=0",
                "data.batch_size=32",
                "recipe.params.channels=4",
                "recipe.params.dropout=0.0",
                *overrides,
            ]
        )
    )


def plan_for(run_uri: Path) -> LaunchPlan:
    return LaunchPlan(run_uri=str(run_uri), config_hash="x", launch_time=time.time())


def rows(run_uri: Path) -> list[dict]:
    return [json.loads(x) for x in (run_uri / "metrics.jsonl").read_text().splitlines()]


def test_the_logged_lr_is_the_lr_of_that_step(tmp_path: Path) -> None:
    """The row of step k shows the learning rate step k trained with (not step k+1's)."""
    spec = digits_spec(
        tmp_path,
        "optim.lr=0.01",
        "optim.warmup_steps=4",
        "optim.scheduler=linear",
        "optim.min_lr_ratio=0.0",
    )
    run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    logged = [r["lr"] for r in rows(tmp_path / "run") if "lr" in r]
    assert logged == pytest.approx(lrs_of(spec.optim, 10), abs=1e-15)
    assert logged[:6] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01 * (1 - 1 / 6)])


def test_bf16_trains_on_cpu_close_to_fp32(tmp_path: Path) -> None:
    """precision=bf16 on CPU runs under bf16 autocast (the losses differ from fp32's, by less
    than bf16's ~3 significant digits allow) and keeps fp32 weights in its checkpoint."""
    run_loop(digits_spec(tmp_path), plan_for(tmp_path / "fp32"), WorkerContext())
    run_loop(
        digits_spec(tmp_path, "trainer.precision=bf16"),
        plan_for(tmp_path / "bf16"),
        WorkerContext(),
    )
    fp32 = [r["train/loss"] for r in rows(tmp_path / "fp32") if "train/loss" in r]
    bf16 = [r["train/loss"] for r in rows(tmp_path / "bf16") if "train/loss" in r]
    assert len(bf16) == 10 and all(math.isfinite(x) for x in bf16)
    assert bf16 != fp32  # autocast really ran in bf16
    assert bf16 == pytest.approx(fp32, abs=0.05)
    weights = bytes_to_tensors(
        CheckpointStore(str(tmp_path / "bf16")).latest().read("model.safetensors")
    )
    assert {t.dtype for t in weights.values()} == {torch.float32}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_git_state_reports_the_sha_and_the_dirty_flag(tmp_path: Path) -> None:
    assert git_state(str(tmp_path)) == (None, None)  # not a repository
    git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("a = 1\n")
    git(tmp_path, "add", "train.py")
    git(tmp_path, "commit", "-q", "-m", "one")
    sha = git(tmp_path, "rev-parse", "HEAD")
    assert git_state(str(tmp_path)) == (sha, False)
    (tmp_path / "notes.txt").write_text("untracked files do not make it dirty")
    assert git_state(str(tmp_path)) == (sha, False)
    (tmp_path / "train.py").write_text("a = 2\n")  # an uncommitted change to tracked code
    assert git_state(str(tmp_path)) == (sha, True)
