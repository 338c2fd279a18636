"""The forge training loop: one worker's view of a run, in plain PyTorch.

It knows nothing about Ray: :mod:`forge.worker` hands it a :class:`WorkerContext` (rank, device,
collectives, where to send progress). That keeps it testable in one process.

Order of a step: forward/backward for ``accumulate_grad_batches`` micro-batches (gradient sync
only on the last), clip, optimizer step, schedule step; then, by step count: log, validate,
checkpoint. Checkpoints record the exact data position, so a resumed run replays the batches
it would have seen.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from forge.checkpoint import storage
from forge.checkpoint.serialize import bytes_to_tensors, tensors_to_bytes
from forge.checkpoint.storage import StorageOptions
from forge.checkpoint.store import CheckpointStore, CommittedCheckpoint, open_checkpoint
from forge.checkpoint.streamer import CheckpointStreamer
from forge.config.specs import LaunchPlan, RunSpec
from forge.errors import CheckpointError, ConfigError, NonFiniteError, did_you_mean
from forge.loader import batch_len, eval_batches, to_device, train_loader
from forge.nonfinite import NonFiniteGuard
from forge.optim import make_optimizer, make_scheduler
from forge.precision import autocast
from forge.profiling import PROFILE_DIR, StepProfiler
from forge.recipe import Recipe, build_params, import_recipe_module
from forge.strategies import make_strategy
from forge.strategies.memory import memory_events, peak_event, peak_memory
from forge.train_loss import AllReduceAsync, Row, TrainLossWindow, all_reduce_now

log = logging.getLogger(__name__)
T = TypeVar("T")

WARMUP_STEPS_FOR_TIMING = 20  # the first steps pay for allocator warm-up and lazy init


@dataclass
class WorkerContext:
    """What the loop needs from the process group around it.

    Attributes:
        rank, local_rank, world_size: This worker's place in the group.
        device: Where the model and batches go.
        all_reduce_sum: Sums a float tensor across workers in place.
        gather: Gathers one picklable object onto rank 0 (list there, None elsewhere); it is
            also a barrier.
        on_progress: Called on rank 0 with progress events for the driver's console.
        report: Called on every rank with metrics for Ray (end of run, validations).
        driver_alive: Optional ``() -> bool``: whether the driver still runs (a Ray-side
            signal); checked, with the run lock, before each commit.
        all_reduce_sum_async: Starts ``all_reduce_sum`` without waiting and returns the
            function that waits for it (None: the blocking ``all_reduce_sum``).
        wait_for_report: Optional ``(step) -> None``, set under a sweep: called on every rank
            after each validation before the last, once that step's checkpoint is committed;
            returns when Tune has taken the report (forge.sweep.trial).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    all_reduce_sum: Callable[[torch.Tensor], None] = lambda t: None
    gather: Callable[[Any], list[Any] | None] = lambda obj: [obj]
    on_progress: Callable[[dict[str, Any]], None] = lambda event: None
    report: Callable[[dict[str, Any]], None] = lambda metrics: None
    driver_alive: Callable[[], bool] | None = None
    all_reduce_sum_async: AllReduceAsync | None = None
    wait_for_report: Callable[[int], None] | None = None


@dataclass
class LoopState:
    """Where training is; saved in every checkpoint's manifest."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (per worker)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_recipe(spec: RunSpec, table: Any = None) -> Recipe:
    """The recipe's :class:`Recipe`; with a file source, ``build(params, data=table)``."""
    mod = import_recipe_module(spec.recipe.module)
    params = build_params(mod, spec.recipe.params)
    if table is not None:
        from forge.data.recipes import build_with_table

        recipe = build_with_table(mod, params, table, spec.recipe.module)
    else:
        recipe = mod.build(params)
    if not isinstance(recipe, Recipe):
        raise ConfigError(
            f"{spec.recipe.module}.build() returned {type(recipe).__name__}, not forge.Recipe."
        )
    return recipe


def run_loop(spec: RunSpec, plan: LaunchPlan, ctx: WorkerContext) -> dict[str, Any]:
    """Train ``spec`` on this worker; returns rank 0's summary (metrics, step, checkpoints).

    If training raises, uploads still running are abandoned (nothing uncommitted lands after
    the error) and rank 0's metric log is closed without uploading, so every row logged before
    the error reaches a local run folder's ``metrics.jsonl`` and TensorBoard (which writes rows
    in batches), and the error is raised at once.
    """
    on_error: list[Callable[[], None]] = []  # filled as the streamer and metric log open
    try:
        return _run_loop(spec, plan, ctx, on_error)
    except BaseException:
        for close in on_error:  # both idempotent: a non-finite stop has closed them already
            try:
                close()
            except Exception as exc:  # the error that stopped training is the one to raise
                log.warning("Cleaning up after a training error failed: %s", exc)
        raise
    finally:
        gc.unfreeze()  # what setup froze goes back to the collector


def freeze_setup_objects() -> None:
    """Move every object alive now to the garbage collector's permanent generation.

    forge calls it when a worker starts (after its imports) and again just before the first
    step. A Ray worker holds about half a million objects from its imports alone (torch, Ray,
    pandas, pydantic), and the recipe's imports and the model build set off full collections
    before the first step that scanned all of them: two or three per rank, 0.38-0.52 s in all
    on rank 0 of the digits experiment, 0.13-0.16 s with the imports frozen (``gc.callbacks`` in
    a forge worker). Frozen objects are still freed when their last reference goes; only cycles
    among them wait for ``gc.unfreeze()``, which the loop runs when training ends. See
    :func:`gc.freeze`.
    """
    gc.freeze()


def _run_loop(
    spec: RunSpec, plan: LaunchPlan, ctx: WorkerContext, on_error: list[Callable[[], None]]
) -> dict[str, Any]:
    trainer = spec.trainer
    is_main = ctx.rank == 0
    # Same seed everywhere before building: identical init and data splits on every worker.
    seed_everything(spec.seed)
    recipe = build_recipe(spec, plan.data_table)
    if spec.strategy.zero_init and not recipe.builds_model_lazily:
        raise ConfigError(
            f"strategy.zero_init=true needs recipe {spec.recipe.module} to give Recipe.model as "
            "a function that builds the model (model=lambda: MyModel(params)), so that ZeRO-3 "
            "can partition it while it is built; it gave a built module. Change the recipe, or "
            "set strategy.zero_init=false."
        )
    strategy = make_strategy(spec, ctx.rank, ctx.world_size, ctx.device)
    with strategy.init_context():
        model = recipe.build_model()
    # The full size, before sharding (ZeRO-3 parameters built partitioned carry it in ds_numel).
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    model, optimizer = strategy.setup(model, functools.partial(make_optimizer, spec.optim))
    feed = None
    if plan.data_table is not None:  # a file source: this worker's Ray Data shard
        from forge.data.feed import FileFeed

        feed = FileFeed(
            plan.data_table,
            spec.data.batch_size,
            spec.data.shuffle,
            spec.data.shuffle_buffer_rows,
            spec.seed,
            ctx.rank,
            ctx.world_size,
        )
        loader = sampler = None
        micro_per_epoch = feed.batches_per_epoch
    else:
        loader, sampler = train_loader(
            recipe.train_data, spec.data, ctx.rank, ctx.world_size, spec.seed, recipe.collate_fn
        )
        micro_per_epoch = len(loader)
    steps_per_epoch = micro_per_epoch // trainer.accumulate_grad_batches
    if steps_per_epoch == 0:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is more than the "
            f"{micro_per_epoch} batches per epoch on each worker. Lower it or data.batch_size."
        )
    total_steps = min(
        trainer.max_steps or math.inf,
        (trainer.max_epochs or math.inf) * steps_per_epoch,
    )
    total_steps = int(total_steps)
    scheduler = make_scheduler(spec.optim, optimizer, total_steps)
    # Dropout etc. differ per worker; restored exactly from checkpoints on resume.
    torch.manual_seed(spec.seed + 1 + ctx.rank)

    ck = spec.checkpoint
    has_val = feed.table.has_val if feed is not None else recipe.val_data is not None
    if ck.monitor is not None and not has_val:
        raise ConfigError(
            f"checkpoint.monitor={ck.monitor} ranks checkpoints by a validation metric, but "
            f"recipe {spec.recipe.name} has no val_data, so no checkpoint would ever be ranked. "
            "Give the recipe val_data, or remove checkpoint.monitor (~checkpoint.monitor)."
        )
    store = CheckpointStore(
        plan.run_uri,
        ck.keep_last,
        ck.monitor,
        ck.mode,
        keep_best=ck.keep_best,
        options=StorageOptions.from_spec(spec.storage),
        fence=commit_fence_for(spec, plan, ctx),
    )
    if is_main:  # before anyone writes: leftovers of a crashed attempt (the driver holds the lock)
        store.clean_uncommitted()
    # The run's own newest checkpoint wins (a restart after a failure); else resume_from.
    ckpt, state = restore_newest(store, plan, strategy, model, optimizer, scheduler, ctx)
    if ckpt is not None and is_main:
        ctx.on_progress({"event": "resumed", "step": state.step, "uri": ckpt.uri})
    if feed is not None and state.batch_in_epoch:
        # forge.data.feed: a Ray Data shard cannot replay a position inside an epoch.
        if is_main:
            log.warning(
                "Resumed at step %d inside epoch %d of data.source: the epoch starts over "
                "(its %d batches per worker before the checkpoint are seen again); Ray Data "
                "sources resume at epoch boundaries.",
                state.step,
                state.epoch,
                state.batch_in_epoch,
            )
        state.batch_in_epoch = 0

    metrics_writer = None
    if is_main:
        from forge.metrics import open_run_metrics

        # Local storage: straight into the run folder; remote: staged here, uploaded at commits.
        # Rows past the step training resumes from were written by an attempt that died after
        # its last checkpoint: they are dropped, since this attempt logs those steps again.
        metrics_writer = open_run_metrics(plan.run_uri, store.options, resume_step=state.step)
        # On an error, no upload: storage may be what failed, and the error must not wait.
        on_error.append(lambda: metrics_writer.close(upload=False))
    streamer = make_streamer(
        spec,
        store,
        ctx,
        on_commit=lambda c: ctx.on_progress({"event": "checkpoint", "step": c.step, "uri": c.uri}),
        metrics_writer=metrics_writer,
    )
    on_error.insert(0, lambda: streamer.close(cancel=True))  # before the log's last sync
    ctx.on_progress({"event": "start", "total_steps": total_steps, "step": state.step})
    if is_main:  # what the strategy implies per worker, said before the first step
        for event in memory_events(spec, num_params, ctx.world_size, ctx.device):
            ctx.on_progress(event)

    def evaluate() -> dict[str, float]:
        if feed is not None:
            if not feed.table.has_val:
                return {}
            metrics = run_eval(recipe, model, spec, ctx, batches=feed.val_batches())
        elif recipe.val_data is None:
            return {}
        else:
            metrics = run_eval(recipe, model, spec, ctx)
        if ck.monitor is not None and metrics and ck.monitor not in metrics:
            raise ConfigError(
                f"checkpoint.monitor={ck.monitor} is not a metric of recipe "
                f"{spec.recipe.name}'s validation (it gives {', '.join(sorted(metrics))})."
                f"{did_you_mean(ck.monitor, metrics)} Set checkpoint.monitor to one of them."
            )
        return metrics

    # Non-finite loss/gradients: recorded on the device every step; checked without waiting at
    # each log step (read at the next one) and synchronously before every checkpoint and
    # before a train row is logged early (forge.nonfinite).
    skip_nonfinite = trainer.on_nonfinite == "skip"
    guard = NonFiniteGuard(
        ctx.device,
        ctx.rank,
        ctx.world_size,
        state.step,
        # fp16: the loss scaler owns gradient overflow; DeepSpeed steps inside backward.
        check_grads=trainer.precision != "fp16" and not strategy.name.startswith("deepspeed"),
        can_skip=not strategy.name.startswith("deepspeed"),
    )

    def stop_if_nonfinite(check: Callable[..., T], *args: Any) -> T:
        try:
            return check(*args)
        except NonFiniteError:
            # Every rank raises at this (all-reduced) check. What was submitted before passed
            # it: commit that, so a restart resumes from the last good step.
            streamer.finish()
            streamer.close()
            if metrics_writer is not None:
                metrics_writer.close()
            raise

    def save(metrics: dict[str, float], final: bool = False) -> None:
        # Never commit a checkpoint of a run that went non-finite (nor non-finite weights).
        stop_if_nonfinite(guard.check, ctx.all_reduce_sum, strategy.unwrap(model).parameters())
        # Training waits only for the host-memory snapshot; serialization, upload and the
        # commit run in the background (forge.checkpoint.streamer).
        with streamer.snapshot():  # host copies into reused buffers
            files = strategy.checkpoint_files(model, optimizer)
        files[f"rank{ctx.rank}.safetensors"] = tensors_to_bytes(rng_state())
        files_sched = {"scheduler_last_epoch": scheduler.last_epoch}
        streamer.submit(
            state.step,
            files,
            final=final,
            strategy=strategy.name,
            metrics=dict(metrics),
            state={**asdict(state), **files_sched},
            config_hash=plan.config_hash,
            git_sha=plan.git_sha,
            data_fingerprint=plan.data_fingerprint,
        )

    step_times: list[float] = []
    # The logged loss is reduced across ranks asynchronously, about once a second for all the
    # windows closed since, with the non-finite record riding along, and read at the next log
    # step (or validation/checkpoint): reading it never stalls a step (forge.train_loss).
    train_loss = TrainLossWindow(
        ctx.device,
        ctx.all_reduce_sum_async or all_reduce_now(ctx.all_reduce_sum),
        rank=ctx.rank,
        check=(guard.record, guard.raise_if_seen),
    )
    # The step in progress: the sum of its micro-batches' losses (on the device) and their count.
    step_loss: torch.Tensor | None = None
    step_micro = 0
    grad_params = list(model.parameters())  # once: walking the modules every step costs ~10 us

    def log_train(rows: list[Row]) -> None:
        # The non-finite record read with their reduction covered every step of these windows.
        for step, row, wall_time in rows:
            if metrics_writer is not None:
                metrics_writer.log(step, row, wall_time)
            ctx.on_progress({"event": "log", "step": step, **row})

    def log_pending_train_rows() -> None:
        # Rows stay in step order: the train rows closed so far go before a validation's.
        log_train(stop_if_nonfinite(train_loss.flush, state.step))

    last_val: dict[str, float] = {}
    last_val_step = -1
    start_step = state.step
    last_ckpt_step = state.step if ckpt is not None else -1
    first_step_at: float | None = None
    profiler = StepProfiler(
        trainer.profile_steps if is_main else None,
        ctx.device,
        lambda name, data: storage.write_bytes(
            storage.join(plan.run_uri, PROFILE_DIR, name), data, store.options
        ),
        start_step=state.step,
    )
    on_error.append(profiler.abandon)  # the profiler must not stay on in this process
    if state.step == profiler.edge:
        profiler.at_step(state.step)
    tick = time.perf_counter()
    model.train()

    # Micro-batches at an epoch's end that cannot fill a whole accumulation group are skipped,
    # so every optimizer step sees exactly accumulate_grad_batches of them.
    accumulate = trainer.accumulate_grad_batches
    usable = steps_per_epoch * accumulate
    # Per-step invariants, looked up once: under load each Python call of the hot path costs
    # several times its quiet microbenchmark (scripts/bench/ddp_overhead.py --paired).
    log_every, val_every, every = (
        trainer.log_every_n_steps,
        trainer.val_every_n_steps,
        spec.checkpoint.every_n_steps,
    )
    no_context = contextlib.nullcontext()
    precision_context = strategy.autocast(trainer.precision)  # reusable: entered in turn
    move = ctx.device.type != "cpu"  # a CPU batch is already where it goes
    freeze_setup_objects()
    while state.step < total_steps:
        if state.batch_in_epoch >= usable:
            state.epoch += 1
            state.batch_in_epoch = 0
        if feed is not None:
            batches = feed.epoch(state.epoch)
        else:
            sampler.set_epoch(state.epoch, skip=state.batch_in_epoch * spec.data.batch_size)
            batches = loader
        for micro, batch in enumerate(
            itertools.islice(batches, usable - state.batch_in_epoch), start=1
        ):
            state.batch_in_epoch += 1
            sync_now = micro % accumulate == 0
            if move:
                batch = to_device(batch, ctx.device)
            with no_context if sync_now else strategy.no_sync(model):
                with precision_context:
                    loss = recipe.loss_fn(model, batch)
                strategy.backward(model, loss, accumulate)
            micro_loss = loss.detach().float()
            step_loss = micro_loss if step_loss is None else step_loss + micro_loss
            step_micro += 1
            if not sync_now:
                continue
            guard.observe_grads(grad_params)
            # The step's summed loss is non-finite iff one of its micro-batches' was.
            if skip_nonfinite and guard.step_is_bad(ctx.all_reduce_sum, loss=step_loss):
                # Every worker skips it: no update, its losses left out of train/loss. The
                # step still counts, so schedule and data position stay those of a clean run.
                optimizer.zero_grad(set_to_none=True)
            else:
                if not skip_nonfinite:
                    guard.end_step(loss=step_loss)
                strategy.optimizer_step(model, optimizer, trainer.gradient_clip_val)
                train_loss.add_step(step_loss, step_micro)
            step_loss, step_micro = None, 0
            step_lr = scheduler.get_last_lr()[0]  # what this step trained with, for its row
            scheduler.step()
            state.step += 1

            if state.step == profiler.edge:  # trainer.profile_steps (an int compare when off)
                profiler.at_step(state.step)
            now = time.perf_counter()
            step_times.append(now - tick)
            tick = now
            if first_step_at is None:
                first_step_at = time.time()

            if state.step % log_every == 0 or state.step == total_steps:
                # train/loss is filled in when the window's reduction is read, at a later log
                # step; nan only when every step of its window was skipped
                row = {"lr": step_lr, "epoch": state.epoch}
                recent = step_times[-log_every:]
                step_s = sum(recent) / len(recent)
                samples = spec.data.batch_size * accumulate * ctx.world_size
                row["throughput/samples_per_s"] = samples / step_s
                if recipe.tokens_per_sample:
                    row["throughput/tokens_per_s"] = samples * recipe.tokens_per_sample / step_s
                if skip_nonfinite:
                    row["train/skipped_steps"] = guard.skipped
                # No wait for the other ranks here: a reduction started earlier is done by now.
                log_train(stop_if_nonfinite(train_loss.end_window, state.step, row))

            save_now = bool(every) and state.step % every == 0 and state.step < total_steps
            # A checkpoint is ranked only by metrics of its own weights: with a monitor, every
            # checkpoint step is validated too (not only the val_every_n_steps grid).
            validate_now = bool(val_every) and state.step % val_every == 0
            if validate_now or save_now:
                log_pending_train_rows()  # rows stay in step order
            if validate_now or (save_now and ck.monitor is not None):
                last_val, last_val_step = evaluate(), state.step
                if last_val and metrics_writer is not None:
                    metrics_writer.log(state.step, last_val)
                    ctx.on_progress({"event": "val", "step": state.step, **last_val})
            if save_now:
                # Only this step's metrics: a manifest never carries an older validation.
                save(last_val if last_val_step == state.step else {})
                last_ckpt_step = state.step
            streamer.poll()  # commits finished uploads; one tiny all-reduce while any is pending
            if state.step >= total_steps:
                break
            if validate_now and last_val and ctx.wait_for_report is not None:
                streamer.finish()  # Tune's report carries this step's committed checkpoint
                ctx.wait_for_report(state.step)

    profiler.close(state.step)  # a window cut short by the end of training
    log_pending_train_rows()
    if ckpt is not None and state.step == start_step:
        # Nothing left to train (a finished run started again): report its last checkpoint's
        # metrics; evaluating again would log a second row for a step already logged.
        final_val = dict(ckpt.manifest.metrics)
    elif last_val_step == state.step:
        final_val = last_val
    else:
        final_val = evaluate()
        if final_val and metrics_writer is not None:
            metrics_writer.log(state.step, final_val)
            ctx.on_progress({"event": "val", "step": state.step, **final_val})
    if last_ckpt_step != state.step:
        save(final_val, final=True)
    last = streamer.finish() or store.latest(verify=False)  # every checkpoint committed
    streamer.close()
    peaks = ctx.gather(peak_memory(ctx.device))  # every rank: gather is a collective
    if peaks:
        ctx.on_progress(peak_event(peaks, ctx.device))
    if metrics_writer is not None:
        metrics_writer.close()

    timed = step_times[WARMUP_STEPS_FOR_TIMING:] or step_times
    summary: dict[str, Any] = {
        **final_val,
        "step": state.step,
        "epoch": state.epoch,
        "step_time_s": statistics.median(timed) if timed else None,
        "time_to_first_step_s": (first_step_at - plan.launch_time) if first_step_at else None,
        "last_checkpoint": last.uri if last is not None else None,
    }
    if is_main:
        best = store.best()
        summary["best_checkpoint"] = best.uri if best is not None else None
    return summary


def run_eval(
    recipe: Recipe,
    model: nn.Module,
    spec: RunSpec,
    ctx: WorkerContext,
    batches: Any = None,
) -> dict[str, float]:
    """Average each metric over the whole validation set and all workers.

    ``eval_fn`` returns per-example values (or per-token: any whole multiple of the batch size);
    values of padded examples are dropped, so the average is exact for any worker count.
    ``batches`` (``(batch, n_valid)`` pairs) replaces the recipe's ``val_data`` for a file
    source, where every worker sees all of it: sums and counts both scale by the worker count.
    """
    eval_fn = recipe.eval_fn or (lambda m, b: {"loss": recipe.loss_fn(m, b)})
    totals: dict[str, torch.Tensor] = {}  # name -> (sum, count)
    model.eval()
    # Validation must not move the training RNG: a run validated at a step (e.g. the last step
    # of a shorter run that is then continued) trains on exactly as one that was not.
    with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(ctx.device)):
        if batches is None:
            batches = eval_batches(
                recipe.val_data, spec.data.batch_size, ctx.rank, ctx.world_size, recipe.collate_fn
            )
        for batch, n_valid in batches:
            batch_size = batch_len(batch)
            batch = to_device(batch, ctx.device)
            with autocast(spec.trainer.precision, ctx.device):
                values = eval_fn(model, batch)
            for name, value in values.items():
                value = value.detach().double().reshape(-1)
                if len(value) % batch_size == 0:
                    kept = value[: n_valid * (len(value) // batch_size)]
                    pair = torch.stack(
                        [
                            kept.sum(),
                            torch.tensor(float(len(kept)), dtype=torch.float64, device=kept.device),
                        ]
                    )
                else:  # a batch mean: weight it by the real examples in the batch
                    pair = torch.stack(
                        [
                            value.mean() * n_valid,
                            torch.tensor(float(n_valid), dtype=torch.float64, device=value.device),
                        ]
                    )
                totals[name] = totals.get(name, torch.zeros_like(pair)) + pair
    model.train()
    names = sorted(totals)
    if not names:
        return {}
    packed = torch.stack([totals[n] for n in names])
    ctx.all_reduce_sum(packed)
    return {f"val/{n}": (packed[i, 0] / packed[i, 1]).item() for i, n in enumerate(names)}


def _rng_devices(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def commit_fence_for(
    spec: RunSpec, plan: LaunchPlan, ctx: WorkerContext
) -> Callable[[], None] | None:
    """The check rank 0 runs before each commit: this run still holds its lock, and its
    driver is alive (:func:`forge.checkpoint.lock.commit_fence`); None when not fenced."""
    if plan.lock_token is None:
        return None
    from forge.checkpoint.lock import commit_fence

    return commit_fence(
        plan.run_uri,
        plan.lock_token,
        options=StorageOptions.from_spec(spec.storage),
        stale_after_s=spec.storage.lock_stale_after_s,
        driver_alive=ctx.driver_alive,
    )


def make_streamer(
    spec: RunSpec,
    store: CheckpointStore,
    ctx: WorkerContext,
    on_commit: Callable[[CommittedCheckpoint], None],
    metrics_writer: Any | None,
) -> CheckpointStreamer:
    """This worker's checkpoint streamer; both training paths (loop, Lightning) use it.

    After each commit rank 0 also uploads the run's staged metrics (``metrics_writer.sync``), so
    a remote run folder's metrics keep up with its checkpoints.
    """
    return CheckpointStreamer(
        store,
        rank=ctx.rank,
        world_size=ctx.world_size,
        all_reduce_sum=ctx.all_reduce_sum,
        gather=ctx.gather,
        device=ctx.device,
        max_in_flight=spec.checkpoint.max_in_flight,
        async_upload=spec.checkpoint.async_upload,
        on_outage=spec.storage.on_outage,
        outage_max_s=spec.storage.outage_max_s,
        on_commit=on_commit,
        after_commit=(lambda c: metrics_writer.sync()) if metrics_writer is not None else None,
    )


def restore_newest(
    store: CheckpointStore,
    plan: LaunchPlan,
    strategy: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ctx: WorkerContext,
) -> tuple[CommittedCheckpoint | None, LoopState]:
    """Restore the newest checkpoint that every rank can load; call on every rank.

    The run's own checkpoints come first (a restart after a failure), else ``plan.resume_from``.
    Each rank reads only the files it needs and checks their sha256 as it reads; a checkpoint
    that fails anywhere (truncated, corrupt, a refused pickle) is skipped on every rank, with a
    warning naming it, and the one before it is used.
    """
    candidates = store.candidates()  # newest first; sizes checked by listing, nothing downloaded
    if not candidates and plan.resume_from:
        candidates = [open_checkpoint(plan.resume_from, verify=False, options=store.options)]
    skipped = []
    for ckpt in candidates:
        error: CheckpointError | None = None
        try:
            state = restore(
                ckpt, strategy, model, optimizer, scheduler, ctx.rank, world_size=ctx.world_size
            )
        except CheckpointError as exc:
            error = exc
        votes = torch.tensor(
            [float(error is not None), float(ckpt.step)], dtype=torch.float64, device=ctx.device
        )
        ctx.all_reduce_sum(votes)
        if votes[1].item() != float(ckpt.step) * ctx.world_size:
            raise CheckpointError(
                f"Workers disagree on the newest checkpoint under {store.root} (this one saw "
                f"{ckpt.uri}); is another run writing to the same run folder?"
            )
        if votes[0].item() == 0:
            if ctx.rank == 0:
                _uncommit_newer(store, ckpt.step)
            return ckpt, state
        skipped.append(ckpt.uri)
        if error is not None or ctx.rank == 0:
            reason = error or "a file another worker needs is corrupt (see that worker's log)."
            log.warning(
                "Skipping checkpoint %s: %s Falling back to the one before.", ckpt.uri, reason
            )
    if skipped:
        # The model may hold part of a rejected checkpoint by now: do not train on from there.
        raise CheckpointError(
            f"No usable checkpoint: {', '.join(skipped)} could not be loaded (see the warnings "
            "above). Restore a good copy, or start a new run with another run_name."
        )
    return None, LoopState()


def _uncommit_newer(store: CheckpointStore, step: int) -> None:
    """The run goes on from ``step``; every committed checkpoint after it was rejected above
    (truncated, corrupt, refused), and this run will save those steps again."""
    for ckpt in store.committed():
        if ckpt.step > step:
            store.uncommit(ckpt.uri)
            log.warning(
                "Uncommitted %s: it could not be loaded, and this run saves it again.", ckpt.uri
            )


def restore(
    ckpt: CommittedCheckpoint,
    strategy: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
    world_size: int | None = None,
) -> LoopState:
    """Load model/optimizer through the strategy, then schedule, RNG and data position.

    Hyperparameters come from this run's config, not from the checkpoint's optimizer state: a
    PBT trial that continues another trial's checkpoint with a mutated lr or weight decay must
    train with its own values from its first step (for a plain resume they are the same).
    """
    configured = [
        {k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
        for g in optimizer.param_groups
    ]
    strategy.load_checkpoint(model, optimizer, ckpt)
    saved = dict(ckpt.manifest.state)
    saved_world = ckpt.manifest.world_size
    if world_size is not None and world_size != saved_world and "batch_in_epoch" in saved:
        # Workers take every world_size-th sample of the epoch's order, so k batches on each of
        # N workers consumed its first k*N batches. Keep that global position on the new count,
        # rounded down to whole batches: at most one global batch is seen twice, none skipped.
        saved["batch_in_epoch"] = saved["batch_in_epoch"] * saved_world // world_size
    scheduler.last_epoch = saved.pop("scheduler_last_epoch", ckpt.step)
    for group, hyper, base, factor in zip(
        optimizer.param_groups,
        configured,
        scheduler.base_lrs,
        scheduler.lr_lambdas,
        strict=True,
    ):
        group.update(hyper)
        group["initial_lr"] = base  # the configured peak lr, as LambdaLR set it
        group["lr"] = base * factor(scheduler.last_epoch)  # what LambdaLR.step() computes
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    rng_file = f"rank{rank}.safetensors"
    if rng_file in ckpt.manifest.files:  # absent when resuming on more workers than saved
        rng = bytes_to_tensors(ckpt.read(rng_file))
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
    return LoopState(**{k: saved[k] for k in ("step", "epoch", "batch_in_epoch") if k in saved})
