"""Make a Lightning fit as exact as the forge loop: batches, validation values, validation steps.

Lightning, left alone, differs from :mod:`forge.loop` in three ways that change numbers without
an error, and :func:`make_exact` (applied by :func:`forge.lightning_runner.make_trainer`) changes
each on the ``pl.Trainer`` instance forge built:

* **Mid-epoch resume.** For a DataLoader without ``state_dict`` Lightning restarts the resumed
  epoch at batch 0 while its counters say batch *k* (it trains batches 0.. again, and never
  trains the rest; the warning stays in the worker's log). forge positions each train loader at
  batch *k* of that epoch: the sampler's index batches 0..k-1 are skipped (nothing is loaded),
  so the run sees the batches the uninterrupted run would have. That is exact when the order of
  an epoch is a function of the epoch (Lightning's ``DistributedSampler``, a sequential sampler,
  a seeded generator); for a ``RandomSampler`` without a generator it cannot be, and forge says
  so in a warning naming the batches whose order changes.
* **Whole accumulation groups.** Lightning steps the optimizer on a last, partial group at an
  epoch's end (fewer micro-batches, the same 1/accumulate_grad_batches scale: a smaller step
  whose size depends on the dataset length), which also shifts every later step off the batch
  grid. forge drops those leftover micro-batches, as the forge loop does.
* **Validation values and steps.** Lightning's validation ``DistributedSampler`` pads the last
  shard with repeated samples (292/360 instead of the real 359 samples' value), and its
  ``val_check_interval`` counts batches. forge gives validation an unpadded sampler (each rank
  takes every world_size-th sample), and validation runs when the *optimizer step* is due
  (:class:`ValidationSchedule`). Lightning's ``sync_dist`` mean of an epoch divides the mean of
  the ranks' weighted sums by the mean of their sample counts, which is exact, except that the
  counts are integers and their mean is truncated (359 samples on 2 ranks: 179, not 179.5);
  forge's ``strategy.reduce`` takes the mean of integer tensors in float64.

These hooks use four Lightning internals (``_DataConnector._resolve_sampler``,
``_FitLoop._load_combined_loader_states``, ``_TrainingEpochLoop._should_check_val_fx``, and
``Strategy.reduce`` as the ``sync_dist`` function); tests/unit/test_lightning_exact.py and
tests/integration/test_lightning_path.py fail if a Lightning upgrade changes them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import RunningStage
from torch.utils.data import DataLoader, RandomSampler

log = logging.getLogger(__name__)


class ValidationSchedule:
    """Which optimizer steps are validated; decided in ``on_train_batch_end`` on every rank."""

    def __init__(self) -> None:
        self.due_at: int | None = None  # the global step whose validation runs after this batch

    def should_validate(self, trainer: pl.Trainer) -> bool:
        """Replaces ``_TrainingEpochLoop._should_check_val_fx`` (called after each batch)."""
        due, self.due_at = self.due_at, None
        if not trainer.enable_validation:
            return False
        if due is not None and due == trainer.global_step:
            return True
        # Lightning's own rule for a stop requested by a user callback (e.g. EarlyStopping).
        return bool(trainer.should_stop and trainer.fit_loop._can_stop_early)


def make_exact(trainer: pl.Trainer, schedule: ValidationSchedule) -> None:
    """Install forge's exact data positioning, validation sampler and validation schedule."""
    connector = trainer._data_connector
    resolve_sampler = connector._resolve_sampler

    def unpadded_validation_sampler(
        dataloader: DataLoader, shuffle: bool, mode: RunningStage | None = None
    ) -> Any:
        if mode == RunningStage.VALIDATING and connector._requires_distributed_sampler(dataloader):
            from pytorch_lightning.overrides.distributed import (
                UnrepeatedDistributedSamplerWrapper,
            )

            kwargs = dict(trainer.distributed_sampler_kwargs or {})
            kwargs["shuffle"] = False
            return UnrepeatedDistributedSamplerWrapper(dataloader.sampler, **kwargs)
        return resolve_sampler(dataloader, shuffle, mode)

    connector._resolve_sampler = unpadded_validation_sampler

    fit_loop = trainer.fit_loop
    load_states = fit_loop._load_combined_loader_states

    def position_train_loaders() -> None:
        load_states()  # loaders with their own state_dict (torchdata's) restore themselves
        combined = fit_loop._combined_loader
        if combined is None:
            return
        accumulate = trainer.accumulate_grad_batches
        limits = [
            _whole_groups(limit, len(dl) if _sized(dl) else None, accumulate)
            for limit, dl in zip(combined.limits or [], combined.flattened, strict=True)
        ]
        if limits:
            combined.limits = limits
        done = fit_loop.epoch_loop.batch_progress.current.processed if fit_loop.restarting else 0
        if not done or not limits or done >= min(limits):
            return  # a fresh start, or a checkpoint at an epoch's end: a new epoch follows
        combined.flattened = [
            ResumeAt(dl, done, limit) if not hasattr(dl, "load_state_dict") else dl
            for dl, limit in zip(combined.flattened, limits, strict=True)
        ]

    fit_loop._load_combined_loader_states = position_train_loaders

    strategy = trainer.strategy
    reduce = strategy.reduce

    def exact_reduce(tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        mean = isinstance(reduce_op, str) and reduce_op.lower() in ("mean", "avg")
        if mean and isinstance(tensor, torch.Tensor) and not torch.is_floating_point(tensor):
            tensor = tensor.to(torch.float64)  # a mean of counts is not a whole number
        return reduce(tensor, group=group, reduce_op=reduce_op)

    strategy.reduce = exact_reduce  # type: ignore[method-assign]
    fit_loop.epoch_loop._should_check_val_fx = lambda data_fetcher: schedule.should_validate(
        trainer
    )


def _sized(dl: Any) -> bool:
    try:
        len(dl)
        return True
    except TypeError:
        return False


def _whole_groups(limit: float, length: int | None, accumulate: int) -> float:
    """The batches of an epoch that fill whole accumulation groups (all of an endless one)."""
    batches = min(limit, length) if length is not None else limit
    if batches == float("inf"):
        return limit
    return int(batches) // accumulate * accumulate


class ResumeAt:
    """A train DataLoader whose next iteration starts at batch ``skip`` of its epoch (and stops
    at ``limit``); every later iteration is the loader's own. Attributes are the loader's, so
    Lightning still sets the sampler's epoch through it."""

    def __init__(self, loader: Any, skip: int, limit: float) -> None:
        self.loader, self.skip, self.limit = loader, skip, limit
        self._warn_if_order_is_random()

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip = self.skip, 0
        if not skip:
            return iter(self.loader)
        return self._resumed(skip)

    def _resumed(self, skip: int) -> Iterator[Any]:
        # A generator: nothing runs (no index is drawn) until the first batch is asked for,
        # which is after Lightning has set the sampler's epoch.
        remaining = None if self.limit == float("inf") else int(self.limit) - skip
        loader = self.loader
        if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
            log.info("Resuming the epoch at batch %d (skipping its indices, not its data).", skip)
            partial = DataLoader(
                loader.dataset,
                batch_sampler=_SkipFirst(loader.batch_sampler, skip),
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
                timeout=loader.timeout,
                worker_init_fn=loader.worker_init_fn,
                multiprocessing_context=loader.multiprocessing_context,
                # Its own generator: creating this iterator must not draw from the global RNG
                # (the uninterrupted run drew for this epoch before its checkpoint was taken).
                generator=loader.generator or torch.Generator(),
                prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
                pin_memory_device=loader.pin_memory_device,
            )
            yield from itertools.islice(partial, remaining)
        else:  # no index sampler (an iterable dataset): load and drop the first batches
            log.info("Resuming the epoch at batch %d (reading and dropping the first).", skip)
            end = None if remaining is None else skip + remaining
            yield from itertools.islice(iter(loader), skip, end)

    def _warn_if_order_is_random(self) -> None:
        sampler = getattr(self.loader, "sampler", None)
        inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)  # Lightning's wrapper
        for s in (sampler, inner):
            if isinstance(s, RandomSampler) and s.generator is None:
                log.warning(
                    "Resuming mid-epoch at batch %d, but the train DataLoader shuffles with a "
                    "RandomSampler without a generator: the order of this epoch is drawn anew, "
                    "so its remaining batches are not the ones the interrupted run would have "
                    "trained (some samples of this epoch are seen twice, some not at all). Give "
                    "the sampler a seeded torch.Generator, or use a DistributedSampler.",
                    self.skip,
                )
                return


class _SkipFirst:
    """A batch sampler without its first ``skip`` batches of indices."""

    def __init__(self, batch_sampler: Any, skip: int) -> None:
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)
