"""The forge training loop in one process, without Ray: determinism, exact resume, step limits,
data sharding and exact evaluation."""

from __future__ import annotations

import itertools
import json
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from forge.checkpoint.serialize import bytes_to_tensors
from forge.checkpoint.store import CheckpointStore
from forge.config.compose import compose
from forge.config.specs import DataSpec, LaunchPlan, RunSpec
from forge.config.validate import to_run_spec
from forge.errors import ConfigError
from forge.loader import ShardedSampler, eval_batches, train_loader
from forge.loop import WorkerContext, run_eval, run_loop
from forge.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# digits: 1,797 images, 359 held out -> 1,438 training samples.
TRAIN_SIZE = 1438


def digits_spec(storage: Path, *overrides: str) -> RunSpec:
    return to_run_spec(
        compose(
            [
                "experiment=digits",
                f"storage.uri={storage}",
                "trainer.max_steps=30",
                "trainer.log_every_n_steps=5",
                "trainer.val_every_n_steps=10",
                "checkpoint.every_n_steps=5",
                "checkpoint.keep_last=null",
                "data.batch_size=32",
                "recipe.params.channels=4",
                *overrides,
            ]
        )
    )


def plan_for(run_uri: Path | str, resume_from: str | None = None) -> LaunchPlan:
    return LaunchPlan(
        run_uri=str(run_uri), resume_from=resume_from, config_hash="x", launch_time=time.time()
    )


def val_metrics(summary: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in summary.items() if k.startswith("val/")}


def final_weights(run_uri: Path) -> dict[str, torch.Tensor]:
    """The model weights in the run's newest checkpoint."""
    return bytes_to_tensors(CheckpointStore(str(run_uri)).latest().read("model.safetensors"))


def assert_same_run(a: dict[str, Any], b: dict[str, Any], dir_a: Path, dir_b: Path) -> None:
    """Same step, same validation metrics (to 1e-6) and the same final weights (to 1e-6)."""
    assert a["step"] == b["step"]
    assert val_metrics(a)
    for key, value in val_metrics(a).items():
        assert b[key] == pytest.approx(value, abs=1e-6), key
    wa, wb = final_weights(dir_a), final_weights(dir_b)
    assert wa.keys() == wb.keys()
    for name in wa:
        diff = (wa[name] - wb[name]).abs().max().item()
        assert diff <= 1e-6, f"{name} differs by {diff:g}"


class Crash(Exception):
    pass


def crash_after_checkpoint(step: int):
    """An on_progress hook that kills the run right after the checkpoint at ``step``."""

    def hook(event: dict[str, Any]) -> None:
        if event.get("event") == "checkpoint" and event["step"] == step:
            raise Crash(step)

    return hook


# --------------------------------------------------------------------------------------------
# (a) determinism


def test_same_seed_same_result_different_seed_different(tmp_path: Path) -> None:
    a = run_loop(digits_spec(tmp_path, "seed=0"), plan_for(tmp_path / "a"), WorkerContext())
    b = run_loop(digits_spec(tmp_path, "seed=0"), plan_for(tmp_path / "b"), WorkerContext())
    c = run_loop(digits_spec(tmp_path, "seed=1"), plan_for(tmp_path / "c"), WorkerContext())
    assert a["step"] == b["step"] == c["step"] == 30
    assert set(val_metrics(a)) == {"val/loss", "val/accuracy"}
    assert val_metrics(a) == val_metrics(b)
    assert val_metrics(a)["val/loss"] != val_metrics(c)["val/loss"]

    def train_losses(run: str) -> list[float]:
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    assert train_losses("a") == train_losses("b")
    assert train_losses("a") != train_losses("c")


# --------------------------------------------------------------------------------------------
# (b) exact resume


def test_resume_with_a_longer_limit_is_exact(tmp_path: Path) -> None:
    """30 steps straight == 15 steps, then the same run continued to 30.

    The LR schedule depends on trainer.max_steps, so this compares runs on a constant schedule;
    dropout is off so that only data position, optimizer and model state matter.
    """
    common = ("optim.scheduler=constant", "recipe.params.dropout=0.0")
    straight = run_loop(
        digits_spec(tmp_path, *common), plan_for(tmp_path / "straight"), WorkerContext()
    )
    first = run_loop(
        digits_spec(tmp_path, *common, "trainer.max_steps=15"),
        plan_for(tmp_path / "resumed"),
        WorkerContext(),
    )
    assert first["step"] == 15
    events: list[dict[str, Any]] = []
    resumed = run_loop(
        digits_spec(tmp_path, *common),
        plan_for(tmp_path / "resumed"),
        WorkerContext(on_progress=events.append),
    )
    assert [e["step"] for e in events if e["event"] == "resumed"] == [15]
    assert resumed["step"] == straight["step"] == 30
    assert_same_run(straight, resumed, tmp_path / "straight", tmp_path / "resumed")


def test_resume_after_a_crash_is_exact(tmp_path: Path) -> None:
    """A run killed after its step-15 checkpoint and restarted ends exactly where an
    uninterrupted one does, dropout and cosine schedule included (the default digits setup)."""
    straight = run_loop(digits_spec(tmp_path), plan_for(tmp_path / "straight"), WorkerContext())
    with pytest.raises(Crash):
        run_loop(
            digits_spec(tmp_path),
            plan_for(tmp_path / "crashed"),
            WorkerContext(on_progress=crash_after_checkpoint(15)),
        )
    assert CheckpointStore(str(tmp_path / "crashed")).latest().step == 15
    resumed = run_loop(digits_spec(tmp_path), plan_for(tmp_path / "crashed"), WorkerContext())
    assert resumed["step"] == straight["step"] == 30
    assert_same_run(straight, resumed, tmp_path / "straight", tmp_path / "crashed")


def test_resume_after_a_crash_without_randomness_is_exact(tmp_path: Path) -> None:
    """The same, with dropout off: the data position, optimizer and schedule restore exactly."""
    straight = run_loop(
        digits_spec(tmp_path, "recipe.params.dropout=0.0"),
        plan_for(tmp_path / "straight"),
        WorkerContext(),
    )
    with pytest.raises(Crash):
        run_loop(
            digits_spec(tmp_path, "recipe.params.dropout=0.0"),
            plan_for(tmp_path / "crashed"),
            WorkerContext(on_progress=crash_after_checkpoint(15)),
        )
    resumed = run_loop(
        digits_spec(tmp_path, "recipe.params.dropout=0.0"),
        plan_for(tmp_path / "crashed"),
        WorkerContext(),
    )
    assert resumed["step"] == 30
    assert_same_run(straight, resumed, tmp_path / "straight", tmp_path / "crashed")


def test_resume_from_another_runs_checkpoint(tmp_path: Path) -> None:
    spec = digits_spec(tmp_path, "trainer.max_steps=10")
    first = run_loop(spec, plan_for(tmp_path / "first"), WorkerContext())
    events: list[dict[str, Any]] = []
    second = run_loop(
        digits_spec(tmp_path, "trainer.max_steps=20"),
        plan_for(tmp_path / "second", resume_from=first["last_checkpoint"]),
        WorkerContext(on_progress=events.append),
    )
    assert second["step"] == 20
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[0]["step"] == 10 and resumed[0]["uri"] == first["last_checkpoint"]
    steps = [c.step for c in CheckpointStore(str(tmp_path / "second")).committed()]
    assert steps == [15, 20]  # the new run folder starts after the checkpoint it came from


def test_finished_run_is_not_retrained(tmp_path: Path) -> None:
    """Starting a finished run again resumes at its last step and trains nothing: no step, no
    new row, no checkpoint written (a run retrained from scratch on the same path would give
    the same deterministic metrics, so those alone prove nothing)."""
    spec = digits_spec(tmp_path, "trainer.max_steps=10")
    first = run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    rows_before = metrics_file.read_text()
    manifests = {p: p.read_bytes() for p in (tmp_path / "run").rglob("manifest.json")}
    events: list[dict[str, Any]] = []
    again = run_loop(spec, plan_for(tmp_path / "run"), WorkerContext(on_progress=events.append))
    assert again["step"] == 10
    assert [e["step"] for e in events if e["event"] == "resumed"] == [10]
    assert not [e for e in events if e["event"] in ("log", "val", "checkpoint")]
    assert metrics_file.read_text() == rows_before
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("manifest.json")} == manifests
    assert again["last_checkpoint"] == first["last_checkpoint"]
    assert val_metrics(again) == val_metrics(first)


# --------------------------------------------------------------------------------------------
# (c) limits and gradient accumulation


def last_state(run_uri: Path) -> dict[str, Any]:
    return CheckpointStore(str(run_uri)).latest().manifest.state


@pytest.mark.parametrize(
    ("overrides", "step", "epoch", "batch_in_epoch"),
    [
        # 1,438 samples / 64 = 22 batches per epoch
        (["trainer.accumulate_grad_batches=2", "trainer.max_steps=7"], 7, 0, 14),
        (["trainer.max_steps=null", "trainer.max_epochs=1"], 22, 0, 22),
        (["trainer.max_steps=null", "trainer.max_epochs=2"], 44, 1, 22),
        (
            ["trainer.max_steps=null", "trainer.max_epochs=2", "trainer.accumulate_grad_batches=2"],
            22,
            1,
            22,
        ),
        (["trainer.max_steps=5", "trainer.max_epochs=2"], 5, 0, 5),  # the first limit wins
        (["trainer.max_steps=30", "trainer.max_epochs=1"], 22, 0, 22),
    ],
)
def test_limits_stop_at_the_right_step(
    tmp_path: Path, overrides: list[str], step: int, epoch: int, batch_in_epoch: int
) -> None:
    spec = digits_spec(tmp_path, "data.batch_size=64", "trainer.val_every_n_steps=0", *overrides)
    summary = run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    assert summary["step"] == step
    assert summary["epoch"] == epoch
    state = last_state(tmp_path / "run")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (
        step,
        epoch,
        batch_in_epoch,
    )


def test_accumulation_more_than_an_epoch_is_a_config_error(tmp_path: Path) -> None:
    spec = digits_spec(tmp_path, "data.batch_size=64", "trainer.accumulate_grad_batches=23")
    with pytest.raises(ConfigError, match="accumulate_grad_batches=23"):
        run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())


def test_accumulating_two_half_batches_equals_one_full_batch(tmp_path: Path) -> None:
    """Gradients are averaged over micro-batches: 2 x 32 with accumulation == 1 x 64.

    Plain SGD (no momentum, no clipping, constant lr) moves the weights by exactly lr x the
    gradient, so summed instead of averaged gradients (2x) show in the weights; AdamW would
    normalize the scale away."""
    base = (
        "recipe.params.dropout=0.0",
        "trainer.max_steps=10",
        "trainer.val_every_n_steps=0",
        "optim.name=sgd",
        "optim.lr=0.5",
        "optim.momentum=0.0",
        "optim.scheduler=constant",
        "trainer.gradient_clip_val=null",
    )
    full = run_loop(
        digits_spec(tmp_path, *base, "data.batch_size=64"),
        plan_for(tmp_path / "full"),
        WorkerContext(),
    )
    accumulated = run_loop(
        digits_spec(tmp_path, *base, "data.batch_size=32", "trainer.accumulate_grad_batches=2"),
        plan_for(tmp_path / "acc"),
        WorkerContext(),
    )
    assert full["step"] == accumulated["step"] == 10
    for key, value in val_metrics(full).items():
        assert accumulated[key] == pytest.approx(value, abs=1e-5), key
    wf, wa = final_weights(tmp_path / "full"), final_weights(tmp_path / "acc")
    for name in wf:
        assert torch.allclose(wa[name], wf[name], atol=1e-5), name


RECIPE_COUNTING_MICRO_BATCHES = textwrap.dedent(
    """
    import torch
    from torch.utils.data import TensorDataset

    import forge


    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))


    def loss_fn(model, batch):
        # d(loss)/dw == 1 for every micro-batch
        return model.w * 1.0 + 0.0 * batch[0].sum()


    def build(params):
        return forge.Recipe(
            model=One(), train_data=TensorDataset(torch.arange(10.0)), loss_fn=loss_fn
        )
    """
)


def test_every_optimizer_step_sees_exactly_accumulate_grad_batches_micro_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10 micro-batches per epoch, accumulation 3: each step's gradient is the mean of exactly
    3 micro-batches. The epoch's leftover micro-batch must not leak into the next epoch's first
    step (that step would see 4 micro-batches' gradients scaled by 1/3)."""
    path = tmp_path / f"count_micro_{uuid.uuid4().hex}.py"
    path.write_text(RECIPE_COUNTING_MICRO_BATCHES)
    spec = RunSpec(
        recipe={"name": "count", "module": str(path)},
        data={"batch_size": 1, "shuffle": False},
        optim={"name": "sgd", "lr": 0.1, "scheduler": "constant"},
        trainer={
            "max_steps": None,
            "max_epochs": 2,
            "accumulate_grad_batches": 3,
            "val_every_n_steps": 0,
        },
        checkpoint={"every_n_steps": 0},
        storage={"uri": str(tmp_path)},
    )
    import forge.loop

    grads: list[float] = []
    real_make_optimizer = forge.loop.make_optimizer

    def recording_make_optimizer(optim_spec, params, **kw):
        opt = real_make_optimizer(optim_spec, params, **kw)
        opt.register_step_pre_hook(
            lambda o, args, kwargs: grads.append(float(o.param_groups[0]["params"][0].grad))
        )
        return opt

    monkeypatch.setattr(forge.loop, "make_optimizer", recording_make_optimizer)
    summary = run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    assert len(grads) == summary["step"] >= 6  # at least 3 steps per epoch, 2 epochs
    # No step may see more than accumulate_grad_batches micro-batches' worth of gradient.
    assert max(grads) <= 1.0 + 1e-6, f"per-step gradients {grads}: a leftover micro-batch leaked"
    assert grads[:3] == pytest.approx([1.0] * 3)


# --------------------------------------------------------------------------------------------
# (d) sharding and exact evaluation


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("size", [10, 11, 7])
def test_sharded_sampler_partitions_and_skips(world_size: int, shuffle: bool, size: int) -> None:
    samplers = [ShardedSampler(size, r, world_size, shuffle, seed=5) for r in range(world_size)]
    for epoch in (0, 1):
        shards = []
        for s in samplers:
            s.set_epoch(epoch)
            shards.append(list(s))
        per_rank = size // world_size
        assert all(
            len(shard) == per_rank == len(s) for shard, s in zip(shards, samplers, strict=False)
        )
        flat = [i for shard in shards for i in shard]
        assert len(set(flat)) == len(flat) == per_rank * world_size  # disjoint, equal shares
        assert set(flat) <= set(range(size))
        for skip in range(per_rank + 1):
            for s, shard in zip(samplers, shards, strict=False):
                s.set_epoch(epoch, skip=skip)
                assert list(s) == shard[skip:]
                assert len(s) == per_rank - skip
            for s in samplers:  # set_epoch without skip starts from the beginning again
                s.set_epoch(epoch)
    if shuffle and size >= 10:
        s = samplers[0]
        s.set_epoch(0)
        e0 = list(s)
        s.set_epoch(1)
        assert list(s) != e0  # reshuffled per epoch
        s.set_epoch(0)
        assert list(s) == e0  # ... reproducibly


def test_sampler_order_depends_on_the_seed() -> None:
    a = list(ShardedSampler(50, 0, 1, True, seed=0))
    b = list(ShardedSampler(50, 0, 1, True, seed=1))
    assert sorted(a) == sorted(b) == list(range(50)) and a != b


def test_train_loader_skip_resumes_on_the_next_batch() -> None:
    data = TensorDataset(torch.arange(40))
    spec = DataSpec(batch_size=4)
    loader, sampler = train_loader(data, spec, rank=1, world_size=2, seed=3, collate_fn=None)
    sampler.set_epoch(2)
    batches = [b[0].tolist() for b in loader]
    assert len(batches) == len(loader) == 5
    sampler.set_epoch(2, skip=3 * 4)
    assert [b[0].tolist() for b in loader] == batches[3:]


def test_train_loader_refuses_too_small_a_dataset() -> None:
    spec = DataSpec(batch_size=8)
    with pytest.raises((ValueError, ConfigError), match="data.batch_size=8"):
        train_loader(TensorDataset(torch.arange(10)), spec, 0, 2, 0, None)


@pytest.mark.parametrize(
    ("size", "world_size", "batch_size"),
    list(itertools.product([1, 2, 7, 10, 11], [1, 2, 3], [1, 3, 4])),
)
def test_eval_batches_count_every_example_exactly_once(
    size: int, world_size: int, batch_size: int
) -> None:
    data = TensorDataset(torch.arange(size))
    counts: Counter[int] = Counter()
    n_batches = set()
    for rank in range(world_size):
        batches = list(eval_batches(data, batch_size, rank, world_size, None))
        n_batches.add(len(batches))
        for (indices,), n_valid in batches:
            assert 0 <= n_valid <= len(indices) <= batch_size
            counts.update(indices[:n_valid].tolist())
    assert len(n_batches) == 1  # every rank runs the same number of batches (collectives)
    assert counts == Counter(range(size))


class _Summing:
    """Simulates all_reduce_sum across ranks run one after the other: records each packet."""

    def __init__(self) -> None:
        self.packets: list[torch.Tensor] = []

    def __call__(self, tensor: torch.Tensor) -> None:
        self.packets.append(tensor.clone())


@pytest.mark.parametrize("world_size", [2, 3])
def test_run_eval_is_exact_for_any_world_size(tmp_path: Path, world_size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(23, 4)
    y = torch.randn(23)
    model = torch.nn.Linear(4, 1)

    def per_example(m, batch):
        xb, yb = batch
        err = (m(xb).squeeze(-1) - yb) ** 2
        return {"mse": err, "abs": (m(xb).squeeze(-1) - yb).abs()}

    recipe = Recipe(
        model=model,
        train_data=None,
        loss_fn=lambda m, b: per_example(m, b)["mse"].mean(),
        val_data=TensorDataset(x, y),
        eval_fn=per_example,
    )
    spec = digits_spec(tmp_path, "data.batch_size=4")
    single = run_eval(recipe, model, spec, WorkerContext())
    with torch.no_grad():
        expected_mse = float(((model(x).squeeze(-1) - y) ** 2).double().mean())
    assert single["val/mse"] == pytest.approx(expected_mse, rel=1e-6)

    reducer = _Summing()
    for rank in range(world_size):
        ctx = WorkerContext(rank=rank, world_size=world_size, all_reduce_sum=reducer)
        run_eval(recipe, model, spec, ctx)
    total = torch.stack(reducer.packets).sum(0)  # what the all-reduce would produce
    names = sorted(["mse", "abs"])
    combined = {f"val/{n}": float(total[i, 0] / total[i, 1]) for i, n in enumerate(names)}
    assert combined == pytest.approx(single, rel=1e-9)
    assert float(total[0, 1]) == 23  # counts: every example once


# --------------------------------------------------------------------------------------------
# (e) metrics.jsonl


def test_metrics_jsonl_has_train_and_val_rows(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    summary = run_loop(
        digits_spec(tmp_path), plan_for(tmp_path / "run"), WorkerContext(on_progress=events.append)
    )
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    for r in train:
        assert r["train/loss"] > 0 and r["lr"] > 0 and r["throughput/samples_per_s"] > 0
        assert "time" in r and r["epoch"] == 0
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val] == [10, 20, 30]
    assert val[-1]["val/loss"] == pytest.approx(summary["val/loss"])
    assert 0 <= val[-1]["val/accuracy"] <= 1
    # progress events mirror the log and the checkpoints
    assert [e["step"] for e in events if e["event"] == "log"] == [5, 10, 15, 20, 25, 30]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [5, 10, 15, 20, 25, 30]
    assert events[0]["event"] == "start" and events[0]["total_steps"] == 30
    assert (tmp_path / "run" / "tensorboard").is_dir()
    # the summary
    assert summary["last_checkpoint"].endswith("checkpoints/step_00000030")
    assert summary["step_time_s"] > 0
    assert summary["time_to_first_step_s"] is not None


def test_final_validation_when_the_last_step_is_off_the_validation_grid(tmp_path: Path) -> None:
    summary = run_loop(
        digits_spec(tmp_path, "trainer.max_steps=13"), plan_for(tmp_path / "run"), WorkerContext()
    )
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    val_steps = [r["step"] for r in rows if "val/loss" in r]
    assert val_steps == [10, 13]
    assert summary["step"] == 13 and "val/loss" in summary
    latest = CheckpointStore(str(tmp_path / "run")).latest()
    assert latest.step == 13
    assert latest.manifest.metrics["val/loss"] == pytest.approx(summary["val/loss"])


def test_best_checkpoint_by_monitor(tmp_path: Path) -> None:
    summary = run_loop(
        digits_spec(
            tmp_path,
            "checkpoint.monitor=val/accuracy",
            "checkpoint.mode=max",
            "checkpoint.keep_last=1",
        ),
        plan_for(tmp_path / "run"),
        WorkerContext(),
    )
    store = CheckpointStore(str(tmp_path / "run"), monitor="val/accuracy", mode="max")
    best = store.best()
    assert summary["best_checkpoint"] == best.uri
    assert best.manifest.metrics["val/accuracy"] == max(
        c.manifest.metrics.get("val/accuracy", -1) for c in store.committed()
    )


def test_resume_with_a_new_lr_uses_it_from_the_first_step(tmp_path: Path) -> None:
    # A PBT exploit continues another trial's checkpoint with a mutated lr: the checkpoint's
    # optimizer state must not bring the old lr back for the first step(s).
    from safetensors.torch import load

    sgd = ["optim=sgd", "optim.momentum=0.0", "optim.scheduler=constant"]
    first = run_loop(
        digits_spec(tmp_path, "trainer.max_steps=10", "optim.lr=0.5", *sgd),
        plan_for(tmp_path / "first"),
        WorkerContext(),
    )
    second = run_loop(
        digits_spec(tmp_path, "trainer.max_steps=11", "optim.lr=1e-12", *sgd),
        plan_for(tmp_path / "second", resume_from=first["last_checkpoint"]),
        WorkerContext(),
    )
    before = load(Path(first["last_checkpoint"], "model.safetensors").read_bytes())
    after = load(Path(second["last_checkpoint"], "model.safetensors").read_bytes())
    # one SGD step at lr 1e-12 moves no weight visibly; at the checkpoint's 0.5 it would
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-9


# --------------------------------------------------------------------------------------------
# (f) resume is idempotent for everything a run appends (metrics.jsonl, TensorBoard)


def crash_at_log(step: int):
    def hook(event: dict[str, Any]) -> None:
        if event.get("event") == "log" and event["step"] == step:
            raise Crash(step)

    return hook


def tensorboard_steps(run_uri: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_uri / "tensorboard"))
    acc.Reload()  # reads every event file of the folder, applying their purge events
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.parametrize("fallback", ["restart", "corrupt_newest", "torn_last_line"])
def test_a_restarted_run_has_one_row_per_step(tmp_path: Path, fallback: str) -> None:
    """Checkpoint at 20, crash in step 25 (after step 24's row): the restart logs 21-24 again,
    and the rows of the dead attempt past step 20 are gone, in metrics.jsonl and in TensorBoard.
    corrupt_newest: step 20 is corrupt, the run falls back to 10 and drops rows past 10.
    torn_last_line: a SIGKILLed writer left half a row."""
    overrides = (
        "trainer.log_every_n_steps=1",
        "checkpoint.every_n_steps=10",
        "checkpoint.async_upload=false",
        "recipe.params.dropout=0.0",
    )
    run = tmp_path / "run"
    straight = run_loop(
        digits_spec(tmp_path, *overrides), plan_for(tmp_path / "s"), WorkerContext()
    )
    with pytest.raises(Crash):
        run_loop(
            digits_spec(tmp_path, *overrides),
            plan_for(run),
            WorkerContext(on_progress=crash_at_log(24)),
        )
    assert CheckpointStore(str(run)).latest().step == 20
    if fallback == "corrupt_newest":
        (run / "checkpoints/step_00000020/model.safetensors").write_bytes(b"x" * 10)
    if fallback == "torn_last_line":
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 25, "train/lo')
    resumed = run_loop(digits_spec(tmp_path, *overrides), plan_for(run), WorkerContext())
    assert resumed["step"] == 30 and resumed["val/loss"] == pytest.approx(straight["val/loss"])

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 31))
    assert [r["step"] for r in rows if "val/loss" in r] == [10, 20, 30]
    expected = [
        json.loads(line)["train/loss"]
        for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert [r["train/loss"] for r in rows if "train/loss" in r] == pytest.approx(expected, abs=1e-6)
    assert tensorboard_steps(run, "train/loss") == list(range(1, 31))
    assert tensorboard_steps(run, "val/loss") == [10, 20, 30]


def test_a_restart_before_the_first_checkpoint_starts_the_rows_over(tmp_path: Path) -> None:
    overrides = ("trainer.log_every_n_steps=1", "checkpoint.every_n_steps=10")
    run = tmp_path / "run"
    with pytest.raises(Crash):
        run_loop(
            digits_spec(tmp_path, *overrides),
            plan_for(run),
            WorkerContext(on_progress=crash_at_log(7)),
        )
    run_loop(
        digits_spec(tmp_path, *overrides, "trainer.max_steps=8"), plan_for(run), WorkerContext()
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9))


def test_remote_metrics_drop_rows_past_the_resumed_step() -> None:
    from forge.checkpoint import storage
    from forge.metrics import open_run_metrics

    uri = f"memory://resume-metrics-{uuid.uuid4().hex}/run"
    w = open_run_metrics(uri, tensorboard=False)
    for step in range(1, 6):
        w.log(step, {"train/loss": float(step)})
    w.close()
    w = open_run_metrics(uri, tensorboard=False, resume_step=3)
    w.log(4, {"train/loss": 40.0})
    w.close()
    rows = [json.loads(x) for x in storage.read_bytes(f"{uri}/metrics.jsonl").splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


# --------------------------------------------------------------------------------------------
# (g) a checkpoint is ranked only by metrics of its own weights


def manifest_metrics(run_uri: Path) -> dict[int, dict[str, float]]:
    return {c.step: c.manifest.metrics for c in CheckpointStore(str(run_uri)).committed()}


def test_with_a_monitor_every_checkpoint_step_is_validated(tmp_path: Path) -> None:
    """Validation every 15 steps, checkpoints every 10, monitor val/loss: steps 10 and 20 are
    validated too, and each manifest holds its own step's row (not step 15's)."""
    spec = digits_spec(
        tmp_path,
        "trainer.val_every_n_steps=15",
        "checkpoint.every_n_steps=10",
        "checkpoint.monitor=val/loss",
    )
    summary = run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    assert sorted(val) == [10, 15, 20, 30]
    metrics = manifest_metrics(tmp_path / "run")
    assert sorted(metrics) == [10, 20, 30]
    for step in (10, 20, 30):
        assert metrics[step]["val/loss"] == val[step]
    best_step = min((10, 20, 30), key=lambda s: val[s])
    assert summary["best_checkpoint"].endswith(f"step_{best_step:08d}")


def test_without_a_monitor_a_manifest_never_carries_an_older_validation(tmp_path: Path) -> None:
    spec = digits_spec(tmp_path, "trainer.val_every_n_steps=15", "checkpoint.every_n_steps=10")
    run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())
    metrics = manifest_metrics(tmp_path / "run")
    assert metrics[10] == {} and metrics[20] == {}  # step 15's val/loss is not theirs
    assert "val/loss" in metrics[30]


def test_a_monitor_the_validation_does_not_produce_is_refused(tmp_path: Path) -> None:
    spec = digits_spec(tmp_path, "checkpoint.monitor=val/acuracy", "trainer.max_steps=10")
    with pytest.raises(ConfigError, match=r"val/acuracy.*Did you mean 'val/accuracy'"):
        run_loop(spec, plan_for(tmp_path / "run"), WorkerContext())


def test_under_a_sweep_each_validation_waits_for_tune_after_its_commit(tmp_path: Path) -> None:
    """Rank 0 stops at every validation before the last (a Tune report point) and only then:
    the step's checkpoint is already committed and its events have gone out, in that order."""
    spec = digits_spec(tmp_path, "trainer.val_every_n_steps=10", "checkpoint.every_n_steps=10")
    events: list[dict[str, Any]] = []
    waits: list[tuple[int, list[int]]] = []

    def wait_for_report(step: int) -> None:
        committed = [c.step for c in CheckpointStore(str(tmp_path / "run")).committed()]
        waits.append((step, committed))
        assert [e["event"] for e in events if e.get("step") == step][-2:] == ["val", "checkpoint"]

    ctx = WorkerContext(on_progress=events.append, wait_for_report=wait_for_report)
    run_loop(spec, plan_for(tmp_path / "run"), ctx)
    assert [s for s, _ in waits] == [10, 20]  # not 30: the last report waits for the run's end
    assert all(step in committed for step, committed in waits)


@pytest.mark.parametrize("crash", [False, True])
def test_training_freezes_setup_objects_and_unfreezes_them_at_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: bool
) -> None:
    """The loop moves setup's objects out of the collector's view for training (a full
    collection would scan them all) and gives them back when it ends, crashed or not: frozen
    objects in a cycle are never collected."""
    import gc

    frozen_at_first_step: list[int] = []
    events = []

    def on_progress(event: dict) -> None:
        if event["event"] == "log" and not frozen_at_first_step:
            frozen_at_first_step.append(gc.get_freeze_count())
        events.append(event)
        if crash and event["event"] == "log":
            raise Crash

    spec = digits_spec(tmp_path, "trainer.max_steps=4", "trainer.log_every_n_steps=1")
    try:
        run_loop(spec, plan_for(tmp_path / "run"), WorkerContext(on_progress=on_progress))
    except Crash:
        assert crash
    assert frozen_at_first_step and frozen_at_first_step[0] > 1000
    assert gc.get_freeze_count() == 0
