"""Sharding datasets over workers, resumably for training and exactly for evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from forge.config.specs import DataSpec
from forge.errors import ConfigError


class ShardedSampler(Sampler[int]):
    """This rank's share of a (per-epoch reshuffled) dataset, resumable mid-epoch.

    Like ``DistributedSampler`` with ``drop_last=True`` (every rank sees the same number of
    samples, so collectives stay in step), plus ``skip``: samples of this epoch already consumed
    before a checkpoint, so a resumed run sees exactly the batches it would have seen.

    Example:
        >>> s = ShardedSampler(10, rank=1, world_size=2, shuffle=False, seed=0)
        >>> list(s)
        [1, 3, 5, 7, 9]
        >>> s.set_epoch(0, skip=2); list(s)
        [5, 7, 9]
    """

    def __init__(self, size: int, rank: int, world_size: int, shuffle: bool, seed: int) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.per_rank = size // world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        mine = order[self.rank : self.per_rank * self.world_size : self.world_size]
        return iter(mine[self.skip :])

    def __len__(self) -> int:
        return self.per_rank - self.skip


def check_batch_fits(size: int, spec: DataSpec, world_size: int) -> None:
    """Refuse a batch larger than each worker's share of a training set of ``size`` samples.

    Runs on the driver before launch when the recipe reports its size (``train_size``), and on
    every worker as a last line.

    Raises:
        ConfigError: No full batch exists (``drop_last``), naming both keys.

    Example:
        >>> from forge.config.specs import DataSpec
        >>> check_batch_fits(100, DataSpec(batch_size=64), world_size=2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        forge.errors.ConfigError: the training set has 100 samples: 50 per worker, ...
    """
    if size // world_size < spec.batch_size and spec.drop_last:
        raise ConfigError(
            f"the training set has {size} samples: {size // world_size} per worker, fewer than "
            f"data.batch_size={spec.batch_size}, so no full batch exists. Lower data.batch_size "
            "or scaling.num_workers."
        )


def train_loader(
    dataset: Dataset,
    spec: DataSpec,
    rank: int,
    world_size: int,
    seed: int,
    collate_fn: Callable | None,
) -> tuple[DataLoader, ShardedSampler]:
    """The training DataLoader for this rank and its sampler (to set epoch and skip)."""
    size = len(dataset)  # type: ignore[arg-type]
    check_batch_fits(size, spec, world_size)
    sampler = ShardedSampler(size, rank, world_size, spec.shuffle, seed)
    loader = DataLoader(
        dataset,
        batch_size=spec.batch_size,
        sampler=sampler,
        drop_last=spec.drop_last,
        num_workers=spec.loader_workers,
        pin_memory=spec.pin_memory,
        collate_fn=collate_fn,
        persistent_workers=spec.loader_workers > 0,
        # Its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's dropout masks would drift from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def eval_batches(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, collate_fn: Callable | None
) -> Iterator[tuple[Any, int]]:
    """Yield ``(batch, n_valid)`` so every rank runs the same number of batches.

    Ranks get contiguous shards padded to equal length with repeats of the last sample; the
    padded tail of each batch is excluded through ``n_valid``, so metrics are exact.
    """
    size = len(dataset)  # type: ignore[arg-type]
    per_rank = -(-size // world_size)
    start = rank * per_rank
    real = list(range(start, min(start + per_rank, size)))
    indices = real + [size - 1] * (per_rank - len(real))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=collate_fn)
    remaining = len(real)
    for batch in loader:
        n = min(remaining, batch_len(batch))
        remaining -= n
        yield batch, n


def batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, dict):
        return batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return batch_len(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
