"""The log step's hot path: the loss reduced asynchronously in batches of windows and logged later,
progress events batched off the training thread, TensorBoard written by its own thread. What
is logged must not change: the mean of every micro-batch loss of the window, on every rank."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import forge.loop
import forge.train_loss
from forge.checkpoint import storage
from forge.config.compose import compose
from forge.config.specs import LaunchPlan
from forge.config.validate import to_run_spec
from forge.loop import WorkerContext, run_loop
from forge.metrics import MetricsWriter, open_run_metrics, read_metrics
from forge.progress_sender import BatchedSender
from forge.train_loss import TrainLossWindow, all_reduce_now

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def two_identical_ranks_async(started: list[torch.Tensor]) -> Any:
    """An async all-reduce over two ranks holding the same values, whose result exists only
    once waited for: until then the tensor holds NaN, so a read before ``wait`` shows."""

    def start(tensor: torch.Tensor) -> Any:
        mine = tensor.clone()
        tensor.fill_(float("nan"))
        started.append(tensor)

        def wait() -> None:
            tensor.copy_(mine * 2)

        return wait

    return start


def test_logged_loss_is_the_mean_of_its_window_with_the_async_reduction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = to_run_spec(
        compose(
            [
                "experiment=digits",
                f"storage.uri={tmp_path}",
                "trainer.max_steps=23",  # the last window is short: 3 steps
                "trainer.log_every_n_steps=5",
                "trainer.accumulate_grad_batches=2",  # a window = 10 micro-batches
                "trainer.val_every_n_steps=10",
                "checkpoint.every_n_steps=15",
                "data.batch_size=16",
                "recipe.params.channels=4",
            ]
        )
    )
    losses: list[torch.Tensor] = []
    build = forge.loop.build_recipe

    def recording_recipe(spec: Any, data_table: Any = None) -> Any:
        recipe = build(spec, data_table)
        loss_fn = recipe.loss_fn

        def recorded(model: Any, batch: Any) -> torch.Tensor:
            loss = loss_fn(model, batch)
            losses.append(loss.detach().float().clone())
            return loss

        return dataclasses.replace(recipe, loss_fn=recorded)

    monkeypatch.setattr(forge.loop, "build_recipe", recording_recipe)
    started: list[torch.Tensor] = []
    events: list[dict[str, Any]] = []
    plan = LaunchPlan(
        run_uri=str(tmp_path / "run"), resume_from=None, config_hash="x", launch_time=time.time()
    )
    ctx = WorkerContext(
        all_reduce_sum_async=two_identical_ranks_async(started), on_progress=events.append
    )
    run_loop(spec, plan, ctx)

    rows = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "train/loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 23]
    # One reduction per log step here (each is followed by a validation, a checkpoint or the
    # end, which reads what is pending): the window's loss sum and micro-batch count, rank 0's
    # clock, and the non-finite record riding along (forge.nonfinite: one float64 slot per rank).
    assert [tuple(t.shape) for t in started] == [(4,)] * 5
    ends = [0, 10, 20, 30, 40, 46]  # micro-batches consumed at each log step
    for row, lo, hi in zip(rows, ends[:-1], ends[1:], strict=True):
        total = torch.zeros(())  # summed in float32 per optimizer step, then per window
        for i in range(lo, hi, 2):
            total += losses[i] + losses[i + 1]
        # the window's float32 sum, reduced (here: doubled) and divided in float64
        expected = (total.item() * 2) / (2.0 * (hi - lo))
        assert row["train/loss"] == expected, row["step"]
    logged = [e for e in events if e["event"] == "log"]
    assert [e["train/loss"] for e in logged] == [r["train/loss"] for r in rows]
    # Rows stay in step order although each train row is written one log step late: the
    # pending one is flushed before a validation (step 10, 20) and a checkpoint (step 15).
    steps = [r["step"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))]
    assert steps == sorted(steps)


def test_the_loss_window_is_cloned_before_its_reduction_starts() -> None:
    started: list[torch.Tensor] = []
    window = TrainLossWindow(
        torch.device("cpu"), two_identical_ranks_async(started), reduce_every_s=0.0
    )
    window.add(torch.tensor(1.0))
    assert window.end_window(1, {}, wall_time=10.0) == []
    window.add(torch.tensor(3.0))  # the next window: must not leak into the pending one
    assert window.end_window(2, {"lr": 0.5}, wall_time=20.0) == [(1, {"train/loss": 1.0}, 10.0)]
    assert window.flush(2) == [(2, {"train/loss": 3.0, "lr": 0.5}, 20.0)]
    assert window.flush(2) == []


def test_closed_windows_are_reduced_together_about_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rank 0 closes a window every 0.1 s; reductions come every reduce_every_s = 1 s: the
    first alone (the first row is seen at once), then ten windows per collective."""
    clock = [0.0]
    monkeypatch.setattr(
        forge.train_loss, "time", SimpleNamespace(perf_counter=lambda: clock[0], time=time.time)
    )
    reductions: list[int] = []

    def one_rank(tensor: torch.Tensor) -> None:
        reductions.append(tensor.numel())

    window = TrainLossWindow(torch.device("cpu"), all_reduce_now(one_rank), reduce_every_s=1.0)
    logged: list[tuple[int, float]] = []
    for step in range(1, 26):
        clock[0] = step * 0.1
        window.add(torch.tensor(float(step)))
        window.add(torch.tensor(float(step) + 1))
        logged += [(s, row["train/loss"]) for s, row, _ in window.end_window(step, {})]
    # Windows 1 | 2-11 | 12-21, each read at the next log step; 22-25 wait for a flush.
    assert [n // 2 for n in reductions] == [1, 10, 10]  # (loss sum, count) per window, + clock
    assert logged == [(step, step + 0.5) for step in range(1, 22)]
    assert [s for s, _, _ in window.flush(25)] == [22, 23, 24, 25]
    assert [n // 2 for n in reductions] == [1, 10, 10, 4]

    # Another rank keeps the pace of rank 0's clock, not its own (whose windows take 0.1 s too):
    # here it adds 0 to the sum (no rank 0 in this one-rank stand-in), which asks for the most
    # windows per reduction.
    other = TrainLossWindow(torch.device("cpu"), all_reduce_now(one_rank), rank=1)
    reductions.clear()
    for step in range(1, 70):
        clock[0] += 0.1
        other.add(torch.tensor(1.0))
        other.end_window(step, {})
    assert [n // 2 for n in reductions] == [1, forge.train_loss.MAX_WINDOWS]


def test_batched_sender_keeps_order_batches_and_flushes_on_close() -> None:
    batches: list[list[dict[str, Any]]] = []
    send = BatchedSender(batches.append, interval_s=0.2)
    for step in range(50):
        send({"step": step})
    send.close()
    assert [e["step"] for b in batches for e in b] == list(range(50))
    assert len(batches) < 5  # batched, not one round trip per event


def test_batched_sender_never_blocks_the_caller_and_swallows_errors() -> None:
    release = threading.Event()
    calls: list[int] = []

    def slow_put(batch: list[dict[str, Any]]) -> None:  # a store round trip on a busy machine
        calls.append(len(batch))
        release.wait(0.2)
        raise RuntimeError("store unreachable")

    send = BatchedSender(slow_put, interval_s=0.0)
    t0 = time.perf_counter()
    for step in range(100):
        send({"step": step})
    elapsed = time.perf_counter() - t0
    release.set()
    send.close()
    assert elapsed < 0.05  # the training thread never waits for the queue
    assert sum(calls) == 100  # and no event is lost when a put fails


def test_tensorboard_rows_are_written_off_the_calling_thread_in_batches(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callers: list[str] = []
    writer = MetricsWriter(str(tmp_path))
    write = writer._write_tensorboard_rows

    def spy() -> None:
        callers.append(threading.current_thread().name)
        write()

    writer._write_tensorboard_rows = spy  # type: ignore[method-assign]
    for step in range(1, 51):
        writer.log(step, {"train/loss": 1.0 / step, "lr": 0.1, "note": "text"})
    assert len(read_metrics(writer.path)) == 50  # the JSON lines are there at once
    writer.close()
    # One batch for the first row, one at close for the other 49: the TensorBoard thread is not
    # woken once per row.
    assert len(callers) == 2
    assert threading.current_thread().name not in callers
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("train/loss")] == list(range(1, 51))
    assert [s.value for s in acc.Scalars("train/loss")] == pytest.approx(
        [1.0 / step for step in range(1, 51)]
    )
    assert [s.value for s in acc.Scalars("lr")] == pytest.approx([0.1] * 50)
    assert "note" not in acc.Tags()["scalars"]


def test_tensorboard_sync_writes_the_rows_logged_so_far(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = open_run_metrics(f"memory://tb-sync/{tmp_path.name}")
    writer.log(1, {"train/loss": 1.0})
    writer.sync()  # the first batch is written; the next log() waits TENSORBOARD_BATCH_S
    writer.log(2, {"train/loss": 2.0})
    writer.log(3, {"train/loss": 3.0})
    writer.sync()  # a checkpoint commit: what is uploaded holds every row so far
    mirrored = tmp_path / "mirror"
    (mirrored / "tensorboard").mkdir(parents=True)
    for entry in storage.list_dir(f"memory://tb-sync/{tmp_path.name}/tensorboard"):
        data = storage.read_bytes(f"memory://tb-sync/{tmp_path.name}/tensorboard/{entry['name']}")
        (mirrored / "tensorboard" / entry["name"]).write_bytes(data)
    acc = EventAccumulator(str(mirrored / "tensorboard"))
    acc.Reload()
    assert [s.step for s in acc.Scalars("train/loss")] == [1, 2, 3]
    writer.close()
