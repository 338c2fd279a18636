"""The Lightning path: an unchanged LightningModule, trained by Lightning on Ray Train workers.

:mod:`forge.worker` calls :func:`run_lightning` on every Ray Train worker when
``recipe.kind == "lightning"``. It maps forge's config onto a ``pl.Trainer`` (the Ray Train
pattern: a strategy and a cluster environment that take ranks and devices from Ray Train, kept
in :mod:`forge.strategies.lightning_ray`; the ``strategy=`` mapping is in
:mod:`forge.strategies.lightning`) and keeps forge's own guarantees around it, exactly as
:mod:`forge.loop` does for forge-loop recipes:

* **Checkpoints** are forge checkpoints (``CheckpointStore``: per-rank files, a manifest as the
  commit, retention), never Lightning ``.ckpt`` files. Lightning still decides *what* its
  training state is: a small :class:`~lightning_fabric.plugins.io.CheckpointIO` captures the dict
  ``Trainer.save_checkpoint`` builds, and forge splits it into ``model.safetensors`` (the
  LightningModule's ``state_dict``), ``optim.pt`` (optimizer state) and ``lightning.pt`` (loop
  progress, LR schedulers, callback and precision state). Under DeepSpeed the strategy itself
  captures the checkpoint instead: every rank's ZeRO fragments of weights and optimizer state
  in forge's sharded format, plus ``lightning.pt`` on rank 0
  (:mod:`forge.strategies.deepspeed_files`). Every rank adds ``rank{r}.safetensors`` (its RNG
  state).
* **Resume** goes the other way: the same files are assembled back into Lightning's dict and
  handed to ``trainer.fit(ckpt_path=...)`` through that ``CheckpointIO``, so Lightning restores
  weights, optimizer, schedulers and loop counters itself and continues at the saved step (under
  DeepSpeed the strategy loads this rank's fragments into the engine, on any ZeRO stage and
  world size, and hands Lightning the rest). Bytes are read only through
  :mod:`forge.checkpoint.serialize` (safetensors, ``weights_only`` loads).
* **Metrics and progress**: a minimal Lightning logger receives what the module ``self.log``-s;
  rank 0 writes ``metrics.jsonl``/TensorBoard through :class:`forge.metrics.MetricsWriter` and
  sends ``start``/``log``/``val``/``checkpoint`` events to the driver, with the forge loop's
  cadence (every ``trainer.log_every_n_steps`` optimizer steps and the last one).

Order at a step that is due for both: validation first, then the checkpoint, so a checkpoint's
manifest carries the validation metrics of its own step (as in the forge loop), and never an
older step's. With ``checkpoint.monitor`` every checkpoint step is validated. The last step is
always validated and checkpointed. Validation runs at optimizer steps, over unpadded shards, and
a mid-epoch resume continues with the batches the uninterrupted run would have trained
(:mod:`forge.lightning_exact`). A non-finite loss or gradient stops the run
(:mod:`forge.nonfinite`).
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import tempfile
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from forge.checkpoint.serialize import (
    bytes_to_object,
    bytes_to_tensors,
    object_to_bytes,
    tensors_to_bytes,
)
from forge.checkpoint.storage import StorageOptions
from forge.checkpoint.store import CheckpointStore, CommittedCheckpoint, open_checkpoint
from forge.checkpoint.streamer import CheckpointStreamer
from forge.config.specs import LaunchPlan, RunSpec
from forge.errors import CheckpointError, ConfigError, NonFiniteError, did_you_mean
from forge.lightning_exact import ValidationSchedule, make_exact
from forge.loop import (
    WARMUP_STEPS_FOR_TIMING,
    WorkerContext,
    commit_fence_for,
    freeze_setup_objects,
    make_streamer,
    rng_state,
)
from forge.nonfinite import NonFiniteGuard
from forge.recipe import build_params, import_recipe_module
from forge.strategies.lightning import (
    CAPTURE_PATH,
    LIGHTNING_FILE,
    is_capture_path,
    lightning_state_bytes,
    make_lightning_strategy,
    read_lightning_state,
    resume_path,
    uses_fragments,
    without_hyper_parameters,
)

log = logging.getLogger(__name__)  # a child of "forge": rank 0's warnings reach the driver

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.pt"

# forge's precision names -> Lightning's.
PRECISION = {"32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}

_NEVER = 2**62  # a val_check_interval (in batches) that is never reached


# -- the Lightning checkpoint dict <-> forge checkpoint files -------------------------------------


def lightning_checkpoint_files(checkpoint: dict[str, Any]) -> dict[str, bytes]:
    """Split the dict ``Trainer.save_checkpoint`` builds into forge checkpoint files.

    Hyper-parameters are dropped (forge rebuilds the module from ``recipe.params``), so that
    everything left loads back with ``weights_only=True``; anything that would not is refused
    now, at save time, rather than when a resume needs it.
    """
    rest = without_hyper_parameters(checkpoint)
    state_dict = rest.pop("state_dict")
    optimizer_states = rest.pop("optimizer_states", [])
    return {
        MODEL_FILE: tensors_to_bytes(state_dict),
        # One optimizer (the usual case) is stored exactly like the forge loop's optim.pt.
        OPTIM_FILE: object_to_bytes(
            optimizer_states[0] if len(optimizer_states) == 1 else list(optimizer_states)
        ),
        LIGHTNING_FILE: lightning_state_bytes(rest),
    }


def lightning_checkpoint_dict(ckpt: CommittedCheckpoint) -> dict[str, Any]:
    """Reassemble Lightning's full checkpoint dict (DDP, FSDP) from a forge checkpoint."""
    checkpoint = read_lightning_state(ckpt)
    checkpoint["state_dict"] = bytes_to_tensors(ckpt.read(MODEL_FILE))
    optim = bytes_to_object(ckpt.read(OPTIM_FILE), OPTIM_FILE)
    checkpoint["optimizer_states"] = [optim] if isinstance(optim, dict) else list(optim)
    return checkpoint


class _ForgeCheckpointIO(TorchCheckpointIO):
    """Keeps checkpoints for forge in memory; any other path is ordinary Lightning file I/O.

    ``Trainer.save_checkpoint(CAPTURE_PATH)`` lands in :meth:`take` (on rank 0, where Lightning
    calls it); ``trainer.fit(ckpt_path=uri)`` for a staged ``uri`` gets the reassembled dict.
    """

    def __init__(self) -> None:
        super().__init__()
        self._captured: dict[str, Any] | None = None
        self._staged: dict[str, dict[str, Any]] = {}

    def stage(self, path: str, checkpoint: dict[str, Any]) -> None:
        self._staged[path] = checkpoint

    def take(self) -> dict[str, Any]:
        captured, self._captured = self._captured, None
        if captured is None:
            raise CheckpointError("Lightning produced no checkpoint to save (internal error).")
        return captured

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if is_capture_path(path):
            self._captured = checkpoint
        else:
            super().save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if str(path) in self._staged:
            return self._staged.pop(str(path))
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


# -- metrics, progress and checkpoints during fit ------------------------------------------------


class _ForgeLogger(pl.loggers.Logger):
    """Hands whatever Lightning logs to the forge callback (no files of its own)."""

    def __init__(self, sink: _ForgeCallback) -> None:
        super().__init__()
        self._sink = sink

    @property
    def name(self) -> str:
        return "forge"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the run folder's config.yaml already records them

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._sink.on_logged(metrics)


class _ForgeCallback(pl.Callback):
    """forge's side of a Lightning fit: step timing, metrics rows, progress, forge checkpoints."""

    def __init__(
        self,
        spec: RunSpec,
        plan: LaunchPlan,
        ctx: WorkerContext,
        store: CheckpointStore,
        io: _ForgeCheckpointIO,
        resumed: CommittedCheckpoint | None,
    ) -> None:
        self.spec, self.plan, self.ctx, self.store, self.io = spec, plan, ctx, store, io
        self.resumed = resumed
        self.writer: Any = None  # MetricsWriter on rank 0
        self.trainer: pl.Trainer | None = None
        self.started = False
        self.total_steps: int | None = None  # None: an endless dataset limited by max_epochs
        self.start_step = 0
        self.seen_step = 0  # global step at the last on_train_batch_end
        self.epoch = 0  # epoch in progress at the last optimizer step
        self.step_times: list[float] = []
        self.step_samples: list[int] = []  # samples in each step, over all workers
        self.samples = 0  # this worker's samples since the last optimizer step
        self.tick = 0.0
        self.first_step_at: float | None = None
        self.train_sums: dict[str, list[float]] = {}  # name -> [sum, count] since the last row
        self.logged_step = -1
        self.last_val: dict[str, float] = {}
        self.last_val_step = -1  # the step last_val was measured at
        self.schedule = ValidationSchedule()  # which optimizer steps are validated
        self.guard: NonFiniteGuard | None = None  # set at train start (needs the device)
        self.pending_save: int | None = None  # a due checkpoint waiting for its validation
        self._rng: dict[str, torch.Tensor] | None = None  # training RNG while validating
        self.saved_step = resumed.step if resumed is not None else -1
        self.last: CommittedCheckpoint | None = None  # committed by this attempt
        self.streamer: CheckpointStreamer | None = None  # uploads and commits in the background

    def is_last(self, step: int) -> bool:
        return self.total_steps is not None and step >= self.total_steps

    # progress and metrics -------------------------------------------------------------------

    def send(self, event: dict[str, Any]) -> None:
        if self.ctx.rank == 0:
            self.ctx.on_progress(event)

    def write(self, step: int, row: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.log(step, row)

    def on_logged(self, metrics: dict[str, float]) -> None:
        """Called by :class:`_ForgeLogger` with what the module logged, on every rank."""
        trainer = self.trainer
        if trainer is None or trainer.sanity_checking or not self.started:
            return
        values = {
            k: float(v)
            for k, v in metrics.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        step = trainer.global_step
        if trainer.validating:
            self.last_val, self.last_val_step = values, step
            monitor = self.spec.checkpoint.monitor
            if monitor is not None and values and monitor not in values:
                raise ConfigError(
                    f"checkpoint.monitor={monitor} is not a metric the module logs in "
                    f"validation (it logs {', '.join(sorted(values))})."
                    f"{did_you_mean(monitor, values)} Set checkpoint.monitor to one of them."
                )
            if values:
                self.write(step, values)
                self.send({"event": "val", "step": step, **values})
            return
        for name, value in values.items():
            pair = self.train_sums.setdefault(name, [0.0, 0])
            pair[0] += value
            pair[1] += 1
        every = self.spec.trainer.log_every_n_steps
        if step == self.logged_step or not (step % every == 0 or self.is_last(step)):
            return
        row: dict[str, Any] = {n: s / c for n, (s, c) in self.train_sums.items() if c}
        self.train_sums.clear()
        if trainer.optimizers:
            row["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        row["epoch"] = self.epoch
        recent = max(1, min(every, step - max(self.logged_step, self.start_step)))
        seconds = sum(self.step_times[-recent:])
        samples = sum(self.step_samples[-recent:])
        if seconds > 0 and samples > 0:
            row["throughput/samples_per_s"] = samples / seconds
        self.logged_step = step
        self.write(step, row)
        self.send({"event": "log", "step": step, **row})

    # Lightning hooks --------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer = trainer
        total = trainer.estimated_stepping_batches  # max_steps, or what max_epochs comes to
        self.total_steps = int(total) if math.isfinite(total) else None
        self.start_step = self.seen_step = self.logged_step = trainer.global_step
        self.epoch = trainer.current_epoch
        if self.resumed is not None:
            restore_rng(self.resumed, self.ctx.rank)
        self.guard = NonFiniteGuard(
            pl_module.device,
            self.ctx.rank,
            self.ctx.world_size,
            self.start_step,
            check_grads=self.spec.trainer.precision != "fp16",  # fp16: the scaler's business
            can_skip=False,
        )
        self.started = True
        self.send({"event": "start", "total_steps": self.total_steps, "step": self.start_step})
        self.tick = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.samples += _batch_size(batch)
        if self.streamer is not None:
            self.streamer.poll()  # every rank, every batch: commits uploads that have landed
        step = trainer.global_step
        if step == self.seen_step:  # accumulating gradients: no optimizer step yet
            return
        self.seen_step = step
        now = time.perf_counter()
        self.step_times.append(now - self.tick)
        self.step_samples.append(self.samples * self.ctx.world_size)
        self.samples, self.tick = 0, now
        if self.first_step_at is None:
            self.first_step_at = time.time()
        self.epoch = trainer.current_epoch

        final = self.is_last(step)
        if final:
            trainer.should_stop = True  # Lightning's loop ends after this batch anyway
        if self.guard is not None:
            self.guard.end_step()
            log_every = self.spec.trainer.log_every_n_steps
            if final or step % log_every == 0:
                self.guard.check(self.ctx.all_reduce_sum)
        every = self.spec.checkpoint.every_n_steps
        save_now = final or bool(every and step % every == 0)
        val_every = self.spec.trainer.val_every_n_steps
        # The last step is always validated, as in the forge loop; with a monitor, every
        # checkpoint step too (a checkpoint is ranked only by its own weights' metrics).
        validate = (
            final
            or bool(val_every and step % val_every == 0)
            or (save_now and self.spec.checkpoint.monitor is not None)
        )
        if validate and trainer.enable_validation:
            self.schedule.due_at = step
            # Validation must not move the training RNG (its dataloader iterator draws a
            # seed before any validation hook runs): saved here, put back when it ends, so a
            # validated step trains on exactly as one that is not, as in the forge loop.
            self._rng = rng_state()
        if not save_now:
            return
        if validate and trainer.enable_validation:
            self.pending_save = step  # saved in on_validation_end, with this step's metrics
        else:
            self.save(trainer, step)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self.guard is not None:
            self.guard.observe_loss(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.guard is not None:
            self.guard.observe_grads(pl_module.parameters())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rng, self._rng = self._rng, None  # saved when this validation was scheduled
        if rng is not None:
            torch.set_rng_state(rng["torch_cpu"])
            if "torch_cuda" in rng:
                torch.cuda.set_rng_state(rng["torch_cuda"])
        if trainer.sanity_checking or not self.started:
            return
        if self.pending_save is not None and self.pending_save == trainer.global_step:
            self.save(trainer, self.pending_save)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training stopped before the planned last step (a user callback, or fewer batches than
        # estimated): still leave a checkpoint of where it got to.
        if trainer.global_step > max(self.saved_step, 0):
            self.save(trainer, trainer.global_step, final=True)
        if self.streamer is not None:
            self.streamer.finish()  # every checkpoint committed before fit() returns

    # checkpoints ------------------------------------------------------------------------------

    def save(self, trainer: pl.Trainer, step: int, final: bool = False) -> None:
        """Snapshot this rank's files; the streamer uploads them and commits on rank 0 in the
        background. Runs on every rank at the same step."""
        self.pending_save = None
        if self.guard is not None:  # never a checkpoint of a run that went non-finite
            self.guard.check(self.ctx.all_reduce_sum, weights=trainer.lightning_module.parameters())
        trainer.save_checkpoint(CAPTURE_PATH, weights_only=False)  # every rank: a barrier
        files: dict[str, Any]
        if uses_fragments(self.spec):  # every rank's own fragments, from the strategy
            files = trainer.strategy.take_files()
        else:  # Lightning's full dict, which its CheckpointIO gets on rank 0
            files = lightning_checkpoint_files(self.io.take()) if self.ctx.rank == 0 else {}
        files[f"rank{self.ctx.rank}.safetensors"] = tensors_to_bytes(rng_state())
        meta = {
            "strategy": self.spec.strategy.name,
            # Only this step's validation: a manifest never carries an older one.
            "metrics": dict(self.last_val) if self.last_val_step == step else {},
            "state": {"step": step, "epoch": self.epoch},
            "config_hash": self.plan.config_hash,
            "data_fingerprint": self.plan.data_fingerprint,
            "git_sha": self.plan.git_sha,
        }
        if self.streamer is None:  # not wired up (direct use of the callback): synchronous
            committed = self.store.save(
                step,
                files,
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
                gather=self.ctx.gather,
                **meta,
            )
            if committed is not None:
                self.committed(committed)
        else:
            self.streamer.submit(step, files, final=final or self.is_last(step), **meta)
        self.saved_step = step

    def committed(self, ckpt: CommittedCheckpoint) -> None:
        """On rank 0, for every checkpoint committed."""
        self.last = ckpt
        self.send({"event": "checkpoint", "step": ckpt.step, "uri": ckpt.uri})


def _batch_size(batch: Any) -> int:
    from pytorch_lightning.utilities.data import extract_batch_size

    try:
        return extract_batch_size(batch)
    except Exception:  # a batch without tensors: no throughput, but training goes on
        return 0


def restore_rng(ckpt: CommittedCheckpoint, rank: int) -> None:
    rng_file = f"rank{rank}.safetensors"
    if rng_file not in ckpt.manifest.files:  # resuming on more workers than saved
        return
    rng = bytes_to_tensors(ckpt.read(rng_file))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])


# -- the run ----------------------------------------------------------------------------------


def check_strategy(spec: RunSpec) -> None:
    """DDP runs Lightning recipes anywhere; FSDP and DeepSpeed only on GPUs (the driver's
    config check refuses them earlier; this guards direct use)."""
    name = spec.strategy.name
    if name != "ddp" and not spec.scaling.use_gpu:
        raise ConfigError(
            f"strategy={name} cannot run a Lightning recipe on CPU: Lightning's FSDP and "
            "DeepSpeed strategies refuse the CPU accelerator. Use strategy=ddp, or "
            "scaling.use_gpu=true on a cluster with GPUs."
        )


def build_lightning(spec: RunSpec) -> tuple[pl.LightningModule, pl.LightningDataModule | None]:
    mod = import_recipe_module(spec.recipe.module)
    build = getattr(mod, "build_lightning", None)
    if build is None:
        raise ConfigError(
            f"recipe.module={spec.recipe.module} has no build_lightning(params) function, which "
            "recipe.kind=lightning needs (it returns (LightningModule, LightningDataModule|None))."
            " For a forge-loop recipe set recipe.kind=loop."
        )
    built = build(build_params(mod, spec.recipe.params))
    module, data = built if isinstance(built, tuple) else (built, None)
    if not isinstance(module, pl.LightningModule):
        raise ConfigError(
            f"{spec.recipe.module}.build_lightning() returned {type(module).__name__}, not a "
            "pytorch_lightning.LightningModule (lightning.pytorch modules are a different class "
            "hierarchy: import pytorch_lightning as pl in the recipe)."
        )
    if data is not None and not isinstance(data, pl.LightningDataModule):
        raise ConfigError(
            f"{spec.recipe.module}.build_lightning() returned {type(data).__name__} as its data, "
            "not a pytorch_lightning.LightningDataModule (or None)."
        )
    return module, data


def make_trainer(
    spec: RunSpec,
    callback: _ForgeCallback,
    io: _ForgeCheckpointIO,
    root_dir: str,
    module: pl.LightningModule | None = None,
) -> pl.Trainer:
    """forge's config as a ``pl.Trainer`` under the Ray Lightning strategy ``strategy=`` names
    (:func:`forge.strategies.lightning.make_lightning_strategy`)."""
    from forge.strategies.lightning_ray import RayTrainEnvironment

    t = spec.trainer
    trainer = pl.Trainer(
        strategy=make_lightning_strategy(spec, module if module is not None else torch.nn.Module()),
        plugins=[RayTrainEnvironment(), io],
        accelerator="gpu" if spec.scaling.use_gpu else "cpu",
        devices="auto",
        precision=PRECISION[t.precision],  # type: ignore[arg-type]
        max_steps=t.max_steps or -1,
        max_epochs=t.max_epochs,
        min_epochs=0,  # lets the last step's validation run even inside the first epoch
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        # Lightning counts val_check_interval in batches; forge validates at optimizer steps
        # (forge.lightning_exact.ValidationSchedule), so Lightning's own interval never fires.
        val_check_interval=_NEVER,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        # Lightning hands every step's metrics to forge's logger; forge picks the rows
        # (every trainer.log_every_n_steps steps, as the forge loop does).
        log_every_n_steps=1,
        logger=_ForgeLogger(callback),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root_dir,
    )
    make_exact(trainer, callback.schedule)
    return trainer


def run_lightning(spec: RunSpec, plan: LaunchPlan, ctx: WorkerContext) -> dict[str, Any]:
    """Train a Lightning recipe on this worker; returns rank 0's summary, like ``run_loop``."""
    check_strategy(spec)
    is_main = ctx.rank == 0
    if is_main:
        log.warning(
            "recipe %s is a Lightning recipe: its configure_optimizers() chooses the optimizer "
            "and learning-rate schedule and its dataloaders the batch size, so optim.* "
            "(optim.name=%s, optim.lr=%g) and data.* do not apply; set them through "
            "recipe.params.",
            spec.recipe.name,
            spec.optim.name,
            spec.optim.lr,
        )
    # Same seed everywhere before building: identical init and data splits on every worker.
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    module, data = build_lightning(spec)

    ck = spec.checkpoint
    options = StorageOptions.from_spec(spec.storage)
    store = CheckpointStore(
        plan.run_uri,
        ck.keep_last,
        ck.monitor,
        ck.mode,
        keep_best=ck.keep_best,
        options=options,
        fence=commit_fence_for(spec, plan, ctx),
    )
    if is_main:  # before anyone writes: leftovers of a crashed attempt (the driver holds the lock)
        store.clean_uncommitted()
    # The run's own newest checkpoint wins (a restart after a failure); else resume_from.
    ckpt = store.latest() or (
        open_checkpoint(plan.resume_from, options=options) if plan.resume_from else None
    )
    io = _ForgeCheckpointIO()
    callback = _ForgeCallback(spec, plan, ctx, store, io, ckpt)
    if is_main:
        from forge.metrics import open_run_metrics

        # Local storage: straight into the run folder; remote: staged here, uploaded at commits.
        # Rows past the resumed step (a dead attempt's) are dropped: they are logged again.
        callback.writer = open_run_metrics(
            plan.run_uri, options, resume_step=ckpt.step if ckpt is not None else 0
        )
    writer = callback.writer
    callback.streamer = make_streamer(spec, store, ctx, callback.committed, writer)

    with tempfile.TemporaryDirectory(prefix="forge-lightning-") as root_dir:
        trainer = make_trainer(spec, callback, io, root_dir, module)
        callback.trainer = trainer
        try:
            ckpt_path = None
            if ckpt is not None:  # after make_trainer: DeepSpeed resumes through its strategy
                ckpt_path = resume_path(
                    spec, ckpt, trainer.strategy, io.stage, lightning_checkpoint_dict
                )
                if is_main:
                    ctx.on_progress({"event": "resumed", "step": ckpt.step, "uri": ckpt.uri})
            with warnings.catch_warnings():
                # forge positions the loaders itself (forge.lightning_exact); Lightning's
                # "dataloader is not resumable" warning would say the opposite.
                warnings.filterwarnings("ignore", message=".*ended before the epoch ended.*")
                freeze_setup_objects()  # a full GC would scan every import's objects
                trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        except NonFiniteError:
            # Every rank raised at the same (all-reduced) check; what was submitted before it
            # passed that check: commit it, so a restart resumes from the last good step.
            callback.streamer.finish()
            raise
        except BaseException:
            callback.streamer.close(cancel=True)  # nothing uncommitted may land after this
            if callback.writer is not None:  # as the forge loop: storage may be what failed
                callback.writer.close(upload=False)
            raise
        finally:
            gc.unfreeze()
            callback.streamer.close()
            if callback.writer is not None:
                callback.writer.close()

    final_val, epoch = callback.last_val, callback.epoch
    if not callback.started and ckpt is not None:  # nothing left to train: report the checkpoint
        final_val, epoch = dict(ckpt.manifest.metrics), int(ckpt.manifest.state.get("epoch", 0))
    last = callback.last or store.latest(verify=False)
    timed = callback.step_times[WARMUP_STEPS_FOR_TIMING:] or callback.step_times
    first = callback.first_step_at
    summary: dict[str, Any] = {
        **final_val,
        "step": trainer.global_step,
        "epoch": epoch,
        "step_time_s": statistics.median(timed) if timed else None,
        "time_to_first_step_s": (first - plan.launch_time) if first else None,
        "last_checkpoint": last.uri if last is not None else None,
    }
    if is_main:
        best = store.best()
        summary["best_checkpoint"] = best.uri if best is not None else None
    return summary
