"""Training that goes non-finite stops (default) or skips the step (opt-in), with exact values.

A one-weight recipe makes every number known in advance: loss = w * x (or sqrt|w * x|), batch
size 1, no shuffle, plain SGD, so step k sees x[k-1] and w moves by -lr * x per step.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from forge.checkpoint.serialize import bytes_to_tensors
from forge.checkpoint.store import CheckpointStore
from forge.config.specs import LaunchPlan, RunSpec
from forge.errors import NonFiniteError
from forge.loop import WorkerContext, run_loop
from forge.nonfinite import NonFiniteGuard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALAR_RECIPE = textwrap.dedent(
    """
    from dataclasses import dataclass, field

    import torch
    from torch.utils.data import TensorDataset

    import forge


    @dataclass
    class Params:
        xs: list = field(default_factory=list)
        loss: str = "linear"  # linear: w * x; sqrt: sqrt(|w * x|), whose gradient at x=0 is NaN
        val: list = field(default_factory=list)  # validation xs (none: no validation)


    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))


    def build(params):
        def loss_fn(model, batch):
            x = batch[0].sum()
            if params.loss == "sqrt":
                return torch.sqrt((model.w * x).abs())
            return model.w * x

        data = TensorDataset(torch.tensor(params.xs, dtype=torch.float32))
        val = TensorDataset(torch.tensor(params.val, dtype=torch.float32)) if params.val else None
        return forge.Recipe(model=One(), train_data=data, loss_fn=loss_fn, val_data=val)
    """
)


def scalar_spec(tmp_path: Path, xs: list[float], **kw: Any) -> RunSpec:
    path = tmp_path / f"scalar_{uuid.uuid4().hex}.py"
    path.write_text(SCALAR_RECIPE)
    trainer = {
        "max_steps": len(xs),
        "val_every_n_steps": 0,
        "log_every_n_steps": kw.pop("log_every", 100),
        **kw.pop("trainer", {}),
    }
    return RunSpec(
        recipe={
            "name": "scalar",
            "module": str(path),
            "params": {"xs": xs, **kw.pop("params", {})},
        },
        data={"batch_size": 1, "shuffle": False},
        optim={"name": "sgd", "lr": kw.pop("lr", 0.1), "scheduler": "constant"},
        trainer=trainer,
        checkpoint={"every_n_steps": kw.pop("every", 1), "keep_last": None},
        storage={"uri": str(tmp_path)},
    )


def plan_for(run_uri: Path) -> LaunchPlan:
    return LaunchPlan(run_uri=str(run_uri), config_hash="x", launch_time=time.time())


def committed_steps(run_uri: Path) -> list[int]:
    return [c.step for c in CheckpointStore(str(run_uri)).committed()]


def weight(run_uri: Path) -> float:
    ckpt = CheckpointStore(str(run_uri)).latest()
    return float(bytes_to_tensors(ckpt.read("model.safetensors"))["w"])


def rows(run_uri: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_uri / "metrics.jsonl").read_text().splitlines()]


NAN = float("nan")


@pytest.mark.parametrize("bad", [NAN, math.inf])
def test_a_non_finite_loss_stops_the_run_at_its_step(tmp_path: Path, bad: float) -> None:
    """x[2] is NaN (or inf): step 3's loss is not finite. The run stops naming step 3 and the
    loss; checkpoints 1 and 2 are committed, none from step 3 on."""
    spec = scalar_spec(tmp_path, [1.0, 2.0, bad, 3.0, 4.0, 5.0])
    with pytest.raises(NonFiniteError, match=r"at step 3: the training loss was NaN or inf"):
        run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    assert committed_steps(tmp_path / "run") == [1, 2]
    assert weight(tmp_path / "run") == pytest.approx(1 - 0.1 * (1 + 2))


def test_the_first_bad_step_is_named_when_found_later(tmp_path: Path) -> None:
    """No checkpoint and no log row until the end (step 6): the record kept on the device still
    names step 3, the first bad one, not step 6 where it was read; nothing is committed."""
    spec = scalar_spec(tmp_path, [1.0, 2.0, NAN, 3.0, NAN, 5.0], every=0)
    with pytest.raises(NonFiniteError, match=r"at step 3: the training loss"):
        run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    assert committed_steps(tmp_path / "run") == []
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()  # no NaN row was logged


def test_log_steps_check_without_waiting_and_never_log_a_non_finite_row(tmp_path: Path) -> None:
    """Log every 2 steps, step 3 NaN, no checkpoints. Each log step starts a check and reads the
    one the previous log step started before it logs that window: step 4 logs the window of
    step 2 and starts the check of steps 1-4; step 6 reads it and stops, naming step 3. The
    window of steps 3-4, which holds the NaN, is never logged."""
    spec = scalar_spec(tmp_path, [1.0, 2.0, NAN, 3.0, 4.0, 5.0, 6.0, 7.0], every=0, log_every=2)
    events: list[dict[str, Any]] = []
    with pytest.raises(NonFiniteError, match=r"at step 3: the training loss"):
        run_loop(spec, plan_for(tmp_path / "run"), WorkerContext(on_progress=events.append))
    logged = [(r["step"], r["train/loss"]) for r in rows(tmp_path / "run") if "train/loss" in r]
    # w starts at 1 (loss w*x, SGD lr 0.1): step 1's loss is 1, step 2's is (1 - 0.1) * 2 = 1.8
    assert logged == [(2, pytest.approx((1.0 + 1.8) / 2))]
    assert [e["step"] for e in events if e["event"] == "log"] == [2]
    assert committed_steps(tmp_path / "run") == []


def test_a_validation_between_log_steps_reads_the_check_first(tmp_path: Path) -> None:
    """No log step before the end, a validation at step 4, step 3 NaN: the validation reads the
    non-finite check up to step 4 before it runs, so it stops the run there and no NaN
    val/loss row is logged (the weights are NaN from step 3 on)."""
    spec = scalar_spec(
        tmp_path,
        [1.0, 2.0, NAN, 3.0, 4.0, 5.0],
        every=0,
        trainer={"val_every_n_steps": 4},
        params={"val": [1.0]},
    )
    with pytest.raises(NonFiniteError, match=r"at step 3: the training loss"):
        run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_non_finite_gradient_with_a_finite_loss_is_named(tmp_path: Path) -> None:
    """sqrt(|w x|) at x=0 is 0, a finite loss, but its gradient is NaN: step 2 is named with
    the gradient norm."""
    spec = scalar_spec(tmp_path, [1.0, 0.0, 1.0], params={"loss": "sqrt"}, lr=1e-3)
    with pytest.raises(NonFiniteError, match=r"at step 2: the gradient norm was NaN or inf"):
        run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    assert committed_steps(tmp_path / "run") == [1]


def test_weights_that_overflow_are_never_checkpointed(tmp_path: Path) -> None:
    """lr=1e38, x=10: loss and gradient are finite, the update sends w to -inf. The step-1
    checkpoint is refused (the weights are checked before every checkpoint)."""
    spec = scalar_spec(tmp_path, [10.0, 1.0], lr=1e38)
    with pytest.raises(NonFiniteError, match=r"at step 1: the weights were NaN or inf after"):
        run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    assert committed_steps(tmp_path / "run") == []


def test_skip_policy_skips_the_step_everywhere_and_counts_it(tmp_path: Path) -> None:
    """on_nonfinite=skip: steps 3 and 5 (NaN) change nothing; w = 1 - 0.1 * (1 + 2 + 4 + 6);
    train/loss leaves the skipped losses out; train/skipped_steps counts them."""
    xs = [1.0, 2.0, NAN, 4.0, NAN, 6.0]
    spec = scalar_spec(tmp_path, xs, log_every=3, trainer={"on_nonfinite": "skip"})
    summary = run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    assert summary["step"] == 6
    assert committed_steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]
    assert weight(tmp_path / "run") == pytest.approx(1 - 0.1 * (1 + 2 + 4 + 6), abs=1e-6)
    train = [r for r in rows(tmp_path / "run") if "train/loss" in r]
    assert [r["train/skipped_steps"] for r in train] == [1, 2]
    # step 1: w=1, loss 1; step 2: w=0.9, loss 1.8 -> mean 1.4 (step 3 left out)
    assert train[0]["train/loss"] == pytest.approx((1.0 + 0.9 * 2.0) / 2)
    # step 4: w=0.7, loss 2.8; step 6: w=0.3, loss 1.8
    assert train[1]["train/loss"] == pytest.approx((0.7 * 4.0 + 0.3 * 6.0) / 2)


def fp16(spec: RunSpec, **trainer: Any) -> RunSpec:
    """fp16 on CPU (the config check wants a GPU; the scaler logic is device-agnostic)."""
    update = {"precision": "fp16", **trainer}
    return spec.model_copy(update={"trainer": spec.trainer.model_copy(update=update)})


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_fp16_overflow_is_the_scalers_alone(tmp_path: Path, policy: str) -> None:
    """x=1e35: the loss is finite, the scaled gradient (x * 65536) is inf. The loss scaler skips
    that step and halves its scale; the guard must neither fail nor skip it a second time:
    w = 1 - 0.1 * (1 + 1 + 1), scale 32768, no step counted as skipped."""
    spec = fp16(scalar_spec(tmp_path, [1.0, 1e35, 1.0, 1.0], log_every=4), on_nonfinite=policy)
    run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    assert weight(tmp_path / "run") == pytest.approx(1 - 0.3, abs=1e-6)
    scaler = json.loads((tmp_path / "run/checkpoints/step_00000004/grad_scaler.json").read_text())
    assert scaler["scale"] == 2.0**15
    if policy == "skip":
        assert rows(tmp_path / "run")[-1]["train/skipped_steps"] == 0


def test_guard_reports_the_earliest_step_over_all_ranks() -> None:
    """Rank 1 went bad at step 4, rank 0 at step 6: every rank raises naming step 4, rank 1."""
    guards = [NonFiniteGuard(torch.device("cpu"), r, 2, step=0) for r in range(2)]
    for step in range(1, 7):
        for rank, guard in enumerate(guards):
            bad = (rank, step) in {(1, 4), (0, 6)}
            guard.observe_loss(torch.tensor(NAN if bad else 1.0))
            guard.end_step()
    # What an all-reduce of both ranks' slots gives.
    total = sum(guard.record() for guard in guards)
    for guard in guards:
        with pytest.raises(NonFiniteError, match=r"at step 4: .* rank 1\)"):
            guard.check(lambda t, total=total: t.copy_(total))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["strategy=deepspeed_zero2"], "strategy=deepspeed_zero2"),
        (["experiment=lightning_digits"], "recipe.kind=lightning"),
    ],
)
def test_skip_is_refused_where_a_step_cannot_be_dropped(overrides: list[str], named: str) -> None:
    from forge.config.compose import compose
    from forge.config.validate import to_run_spec
    from forge.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"trainer.on_nonfinite=skip .*{named}"):
        to_run_spec(compose([*overrides, "trainer.on_nonfinite=skip"]))
    assert to_run_spec(compose(overrides)).trainer.on_nonfinite == "fail"  # the default


@pytest.mark.parametrize("bad_step", [1, 63, 64, 65, 130])
def test_the_first_bad_step_is_named_across_window_folds(bad_step: int) -> None:
    """The record is folded every 64 steps: the step named must not depend on where it fell."""
    guard = NonFiniteGuard(torch.device("cpu"), 0, 1, step=100, window=64)
    bias, weight = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    for step in range(101, 100 + 140):
        guard.observe_loss(torch.tensor(1.0))
        # From bad_step on one gradient element is inf (the loss NaN two steps later).
        bias.grad = torch.ones(2)
        weight.grad = torch.tensor([1.0, float("inf") if step - 100 >= bad_step else 2.0, 3.0])
        guard.observe_grads([bias, weight])
        if step - 100 >= bad_step + 2:
            guard.observe_loss(torch.tensor(NAN))
        guard.end_step()
    with pytest.raises(NonFiniteError, match=rf"at step {100 + bad_step}: the gradient norm"):
        guard.check(lambda t: None)


def test_gradients_in_one_bucket_are_checked_as_one_tensor_and_followed_when_it_moves() -> None:
    """DDP (gradient_as_bucket_view) keeps gradients as views of a bucket and moves them to new
    buckets once after the first step: the check must read the gradients where they are now."""
    guard = NonFiniteGuard(torch.device("cpu"), 0, 1, step=0)
    weight, bias = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3))

    def step(bucket: torch.Tensor) -> None:
        weight.grad, bias.grad = bucket[3:9].view(2, 3), bucket[0:3]
        guard.observe_loss(torch.tensor(1.0))
        guard.observe_grads([weight, bias])
        guard.end_step()

    step(torch.ones(9))
    assert len(guard._grad_norms[-1]) == 1  # one norm over the bucket, not one per parameter
    moved = torch.ones(12)[:9]
    moved[5] = math.inf  # an element of the weight's gradient, in the new bucket
    step(moved)
    with pytest.raises(NonFiniteError, match=r"at step 2: the gradient norm"):
        guard.check(lambda t: None)
