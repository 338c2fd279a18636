"""A file source on Ray: the Ray Data datasets the launcher hands to Ray Train, and each
worker's view of its shard.

Driver (:func:`make_datasets`, called by :mod:`forge.launch`): ``read_parquet``/``read_csv`` of
the exact files the driver checked, then per block the contract's ``drop`` and the hash split
(:class:`SplitRows`), then a seeded block order. Ray Train splits ``train`` across the workers
(``streaming_split(equal=True)``: every worker gets the same number of rows, at most
``world_size - 1`` rows are left out per epoch); ``val`` is not split: every worker evaluates
all of it and the sums are divided by the worker count, so validation metrics are exact.
Nothing is materialized on the driver.

Worker (:class:`FileFeed`): per epoch, batches of ``data.batch_size`` rows from this worker's
shard, shuffled through a local buffer seeded by ``(seed, epoch, rank)``, encoded to tensors by
the :class:`~forge.data.prepare.TableInfo`.

**Resume semantics.** Ray Data's streaming split hands blocks to whichever worker asks next, so
the rows of a given batch position are not reproducible mid-epoch. A run resumed from a
checkpoint taken inside epoch *E* therefore continues at the **start of epoch E** (optimizer
step, schedule, RNG and epoch counter restored exactly; the rows of epoch *E* consumed before
the checkpoint are seen again), and says so in the log. A checkpoint at an epoch boundary
resumes exactly. A different worker count on resume re-shards the data (the next epoch is split
over the new workers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from forge.data.contract import ContractChecker
from forge.data.prepare import TableInfo
from forge.data.source import FileSource, arrow_filesystem, arrow_path
from forge.data.split import val_mask
from forge.errors import TrainingError


class SplitRows:
    """The per-block transform of a file source: contract ``drop``, then one side of the split.

    Picklable (Ray ships it to its map tasks); the same code the driver counted rows with.

    Example:
        >>> from forge.data.source import FileSource
        >>> from forge.checkpoint.storage import StorageOptions
        >>> t = TableInfo(FileSource("d", "csv", (), StorageOptions()), None, ("x",), (), "y",
        ...               ("0", "1"), (0.0,), (1.0,), 8, 2, val_fraction=0.5, split_key="x")
        >>> frame = pd.DataFrame({"x": range(100), "y": [0, 1] * 50, "z": 0})
        >>> a, b = SplitRows(t, "train")(frame), SplitRows(t, "val")(frame)
        >>> len(a) + len(b), list(a.columns), set(a.x) & set(b.x)
        (100, ['x', 'y'], set())
    """

    def __init__(self, table: TableInfo, side: str) -> None:
        self.table, self.side = table, side
        self.checker = (
            ContractChecker(table.contract) if table.contract is not None and table.drop else None
        )

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        t = self.table
        if self.checker is not None:
            frame = frame[~self.checker.row_failures(frame.reset_index(drop=True), record=False)]
        if t.val_fraction and self.side != "val_source":
            held_out = val_mask(frame, t.val_fraction, t.split_key, t.split_seed)
            frame = frame[held_out] if self.side == "val" else frame[~held_out]
        keep = [*t.features, *([t.label] if t.label else [])]
        return frame[keep].reset_index(drop=True)


def _read(source: FileSource, cpus: float | None) -> Any:
    import ray.data

    paths = [arrow_path(p) for p in source.paths]
    fs = arrow_filesystem(source)
    if source.format == "parquet":
        return ray.data.read_parquet(paths, filesystem=fs, file_extensions=None, num_cpus=cpus)
    return ray.data.read_csv(paths, filesystem=fs, file_extensions=None, num_cpus=cpus)


def make_datasets(table: TableInfo, seed: int, cpus: float | None = None) -> dict[str, Any]:
    """``{"train": Dataset, "val": Dataset}`` (val only when there is validation data).

    ``cpus``: CPUs each read/transform task reserves (None: Ray Data's default, one). The
    launcher first checks that the workers leave at least one CPU for these tasks
    (:func:`check_spare_cpus`).
    """
    train = _read(table.source, cpus)
    out = {
        "train": train.map_batches(
            SplitRows(table, "train"), batch_format="pandas", zero_copy_batch=False, num_cpus=cpus
        ).randomize_block_order(seed=seed)
    }
    if table.val is not None:
        out["val"] = _read(table.val, cpus).map_batches(
            SplitRows(table, "val_source"), batch_format="pandas", num_cpus=cpus
        )
    elif table.val_fraction:
        out["val"] = train.map_batches(
            SplitRows(table, "val"), batch_format="pandas", num_cpus=cpus
        )
    return out


def check_spare_cpus(cluster_cpus: float, num_workers: int, cpus_per_worker: float) -> None:
    """Refuse a file source when the training workers would reserve every CPU: Ray Data's read
    and transform tasks then never get one, and training waits for its first batch forever.

    Raises:
        ConfigError: Less than one CPU left over, naming the keys that fix it.

    Example:
        >>> check_spare_cpus(4, 2, 1)
        >>> check_spare_cpus(2, 2, 1)
        Traceback (most recent call last):
        ...
        forge.errors.ConfigError: data.source streams through Ray Data tasks, ...
    """
    from forge.errors import ConfigError

    training = num_workers * cpus_per_worker
    fits = max(0.1, (cluster_cpus - 1) / num_workers)
    if cluster_cpus - training < 1:
        raise ConfigError(
            "data.source streams through Ray Data tasks, which need at least one CPU that the "
            f"training workers do not reserve: the cluster has {cluster_cpus:g} CPU(s) and "
            f"scaling.num_workers={num_workers} x scaling.cpus_per_worker={cpus_per_worker:g} "
            f"reserve {training:g}. Set scaling.cpus_per_worker={fits:.2g}"
            ", use fewer workers, or give the embedded Ray more logical CPUs "
            f"(ray.num_cpus={int(training) + 1})."
        )


class FileFeed:
    """One worker's batches of a file source (call on every worker, inside Ray Train).

    Args:
        table: The checked source.
        batch_size: Rows per batch (``data.batch_size``).
        shuffle: Shuffle within a local buffer of ``buffer_rows`` rows each epoch.
        seed: The run's seed.
        rank, world_size: This worker's place.
    """

    def __init__(
        self,
        table: TableInfo,
        batch_size: int,
        shuffle: bool,
        buffer_rows: int,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        import ray.train

        self.table, self.batch_size, self.shuffle = table, batch_size, shuffle
        self.buffer_rows, self.seed, self.rank, self.world_size = (
            buffer_rows,
            seed,
            rank,
            world_size,
        )
        self.train = ray.train.get_dataset_shard("train")
        self.val = ray.train.get_dataset_shard("val") if table.has_val else None
        # streaming_split(equal=True) gives each worker floor(rows / world_size) rows.
        self.rows_per_worker = table.train_rows // world_size
        self.batches_per_epoch = self.rows_per_worker // batch_size
        self._current: Iterator[tuple[Any, Any]] | None = None

    def epoch(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        """This worker's batches of ``epoch``: exactly :attr:`batches_per_epoch` of them.

        The loop stops taking batches at the epoch's last full accumulation group; the rest of
        the previous epoch is drained here first, because every worker's shard must finish an
        epoch before Ray Data's split starts the next one.
        """
        if self._current is not None:
            for _ in self._current:
                pass
        self._current = self._epoch(epoch)
        return self._current

    def _epoch(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        seed = None
        if self.shuffle:
            seed = int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0])
        batches = self.train.iter_batches(
            batch_size=self.batch_size,
            batch_format="numpy",  # column arrays: no DataFrame per batch on the training thread
            drop_last=True,
            local_shuffle_buffer_size=self.buffer_rows if self.shuffle else None,
            local_shuffle_seed=seed,
        )
        n = 0
        for columns in batches:
            n += 1
            if n <= self.batches_per_epoch:
                yield self.table.encode(columns)
        if n < self.batches_per_epoch:
            raise TrainingError(
                f"worker {self.rank} got {n} batches of data.source in epoch {epoch}, expected "
                f"{self.batches_per_epoch} ({self.table.train_rows} rows checked by the driver):"
                " did the files change during the run? Restart it to check them again."
            )

    def val_batches(self) -> Iterator[tuple[Any, int]]:
        """Every validation row, on every worker, as ``(batch, n_valid)``."""
        if self.val is None:
            return
        for columns in self.val.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
            batch = self.table.encode(columns)
            yield batch, len(batch[0])
