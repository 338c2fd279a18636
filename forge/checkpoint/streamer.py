"""Checkpoints that stream to storage while training goes on.

At a checkpoint the training loop is blocked only while the strategy snapshots state to host
memory (:meth:`Strategy.checkpoint_files`). :meth:`CheckpointStreamer.submit` hands that snapshot
to a background thread, which serializes, hashes and uploads this rank's files (several files and,
on S3, several parts of each at once) and then drops the snapshot.

The commit needs every rank's file list on rank 0, which is a collective; collectives must not
run in a background thread next to training's own on the same process group. So the main thread
drives it: :meth:`~CheckpointStreamer.poll`, called at every step boundary while a checkpoint is
pending, all-reduces four numbers (uploaded / failed here, committed / failed on rank 0). Once
every rank has uploaded, the main thread gathers the file entries to rank 0, whose own background
thread writes the manifest (the commit), moves ``latest.json`` and applies retention.
:meth:`~CheckpointStreamer.finish` does the same, blocking, at the end of training.

Bounded memory: at most ``max_in_flight`` snapshots exist at once. With ``on_outage="fail"`` a
further checkpoint waits for a slot (back-pressure); a storage outage longer than the retry
budget fails the run. With ``on_outage="defer"`` a checkpoint that finds every slot taken is
skipped (training goes on) and pending uploads keep retrying for up to ``outage_max_s``.

Every rank makes the same calls in the same order, so the collectives always line up: the
pending queue changes only through decisions taken on all-reduced values.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from forge.checkpoint.manifest import FileEntry
from forge.checkpoint.retry import RetryPolicy, describe
from forge.checkpoint.staging import HostStaging, Lease
from forge.checkpoint.storage import DEFAULT_OPTIONS
from forge.checkpoint.store import CheckpointStore, CommittedCheckpoint, GatherFn, Payload
from forge.checkpoint.threads import background_pool
from forge.errors import CheckpointError

log = logging.getLogger(__name__)


def _gather_alone(obj: Any) -> list[Any]:
    return [obj]


@dataclass
class _Pending:
    step: int
    meta: dict[str, Any]
    upload: Future[dict[str, FileEntry]]
    submitted_at: float = field(default_factory=time.monotonic)
    commit: Future[CommittedCheckpoint] | None = None
    gathered: bool = False
    warned: bool = False


class CheckpointStreamer:
    """Background save + upload + commit of checkpoints for one rank.

    Args:
        store: Where checkpoints go (its ``options`` say how to reach the storage).
        rank, world_size: This worker's place in the group.
        all_reduce_sum: Sums a float64 tensor across ranks in place (a no-op alone).
        gather: Gathers one picklable object onto rank 0 (a list there, None elsewhere).
        device: Where the all-reduced tensors live (the CUDA device for NCCL).
        max_in_flight: Snapshots held in memory at most (K).
        async_upload: False writes and commits every checkpoint before :meth:`submit` returns.
        on_outage: ``fail`` or ``defer`` (see the module docstring).
        outage_max_s: With ``defer``, how long uploads keep retrying before the run fails.
        on_commit: Called on rank 0, in the calling (main) thread, for each commit.
        after_commit: Called on rank 0 in the background after each commit (e.g. to upload
            metrics files); errors are logged, not raised.

    Example:
        >>> store = CheckpointStore("memory://doc-stream/run")
        >>> streamer = CheckpointStreamer(store)
        >>> streamer.submit(10, {"w.bin": lambda: b"weights"}, strategy="none")
        True
        >>> streamer.finish().step  # waits for the upload and the commit
        10
        >>> store.latest().read("w.bin")
        b'weights'
        >>> streamer.close()
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        rank: int = 0,
        world_size: int = 1,
        all_reduce_sum: Callable[[torch.Tensor], None] = lambda t: None,
        gather: GatherFn = _gather_alone,
        device: torch.device | None = None,
        max_in_flight: int = 2,
        async_upload: bool = True,
        on_outage: str = "fail",
        outage_max_s: float = 3600.0,
        on_commit: Callable[[CommittedCheckpoint], None] | None = None,
        after_commit: Callable[[CommittedCheckpoint], None] | None = None,
    ) -> None:
        if on_outage not in ("fail", "defer"):
            raise ValueError(f"on_outage must be 'fail' or 'defer', not {on_outage!r}")
        self.rank, self.world_size = rank, world_size
        self.all_reduce_sum, self.gather = all_reduce_sum, gather
        self.device = device or torch.device("cpu")
        self.max_in_flight = max(1, max_in_flight)
        self.async_upload = async_upload
        self.on_outage = on_outage
        self.on_commit, self.after_commit = on_commit, after_commit
        options = store.options or DEFAULT_OPTIONS
        self._budget_s = options.retry.max_wait_s
        if on_outage == "defer":
            # Same retry loop, more patience: keep trying for as long as an outage may last.
            patient = RetryPolicy(
                max_attempts=None,
                max_wait_s=outage_max_s,
                initial_backoff_s=options.retry.initial_backoff_s,
                max_backoff_s=30.0,
                budget_key="storage.outage_max_s",
            )
            store = store.with_options(dataclasses.replace(options, retry=patient))
        self.store = store
        self.last: CommittedCheckpoint | None = None  # newest committed by this streamer (rank 0)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._cancel = threading.Event()
        self._staging = HostStaging()
        self._lease: Lease | None = None  # of the snapshot the next submit() takes
        self._uploads = background_pool(self.max_in_flight, "forge-ckpt")
        self._committer = background_pool(1, "forge-commit")
        self._closed = False

    # -- the training loop's side (main thread, every rank) -------------------------------------

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Wrap the strategy's ``checkpoint_files``: its host copies then reuse the buffers of
        an earlier snapshot whose upload has finished (a memcpy instead of page faults)."""
        with self._staging.lease() as lease:
            yield
        self._lease = lease

    def submit(
        self, step: int, files: Mapping[str, Payload], *, final: bool = False, **meta: Any
    ) -> bool:
        """Start saving this rank's snapshot of ``step`` in the background. Call on every rank.

        ``meta`` is what :meth:`CheckpointStore.commit` records (strategy, metrics, state,
        config_hash, git_sha). Returns False when the checkpoint was skipped (``defer`` mode with
        every slot taken; never for ``final``).
        """
        if self._closed:
            raise CheckpointError("this CheckpointStreamer is closed")
        if self.on_outage == "defer" and not final:
            full = self._tensor([float(self._in_flight() >= self.max_in_flight)])
            self.all_reduce_sum(full)
            if full.item() > 0:
                self._release_lease(self._take_lease())
                if self.rank == 0:
                    oldest = self._pending[0].step if self._pending else None
                    log.warning(
                        "Skipping the checkpoint at step %d: %d checkpoint(s) since step %s are "
                        "still uploading (storage slow or unreachable; storage.on_outage=defer "
                        "keeps training).",
                        step,
                        self.max_in_flight,
                        oldest,
                    )
                return False
        else:
            self._wait_for_slot()
        snapshot = dict(files)
        future = self._uploads.submit(self._upload, step, snapshot, self._take_lease())
        self._pending.append(_Pending(step, meta, future))
        if not self.async_upload:
            self.finish()
        return True

    @property
    def in_flight(self) -> int:
        """Checkpoints of this rank still serializing or uploading (holding a snapshot)."""
        return self._in_flight()

    def poll(self) -> list[CommittedCheckpoint]:
        """Advance pending checkpoints without waiting; call at every step, on every rank.

        Costs one small all-reduce while a checkpoint is pending, nothing otherwise. Returns the
        checkpoints committed by this call (on rank 0).
        """
        if not self._pending:
            return []
        return self._advance(block=False)

    def finish(self) -> CommittedCheckpoint | None:
        """Wait until every submitted checkpoint is committed; call on every rank.

        Returns the newest committed checkpoint on rank 0 (None elsewhere, or if none).
        """
        while self._pending:
            self._advance(block=True)
        return self.last

    def close(self, cancel: bool = False) -> None:
        """Stop the background threads; ``cancel`` abandons uploads still running (nothing
        uncommitted becomes visible, and their multipart uploads are aborted)."""
        if self._closed:
            return
        self._closed = True
        if cancel:
            self._cancel.set()
        self._uploads.shutdown(wait=True, cancel_futures=cancel)
        self._committer.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> CheckpointStreamer:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self.close(cancel=exc_type is not None)

    # -- internals -----------------------------------------------------------------------------

    def _tensor(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def _in_flight(self) -> int:
        return sum(not p.upload.done() for p in self._pending)

    def _wait_for_slot(self) -> None:
        while self._in_flight() >= self.max_in_flight:
            wait(
                [p.upload for p in self._pending if not p.upload.done()],
                return_when=FIRST_COMPLETED,
            )

    def _take_lease(self) -> Lease | None:
        lease, self._lease = self._lease, None
        return lease

    def _release_lease(self, lease: Lease | None) -> None:
        if lease is not None:
            self._staging.release(lease)

    def _upload(
        self, step: int, files: dict[str, Payload], lease: Lease | None
    ) -> dict[str, FileEntry]:
        try:
            return self.store.write_files(step, files, cancel=self._cancel)
        finally:
            files.clear()  # the snapshot's memory goes as soon as its bytes have landed ...
            self._release_lease(lease)  # ... or back to the pool, for the next snapshot

    def _commit(self, pending: _Pending, all_entries: list[dict[str, FileEntry]]) -> Any:
        ckpt = self.store.commit(
            pending.step, all_entries, world_size=self.world_size, **pending.meta
        )
        if self.after_commit is not None:
            try:
                self.after_commit(ckpt)
            except Exception as exc:
                log.warning("After committing %s: %s", ckpt.uri, describe(exc))
        return ckpt

    def _advance(self, block: bool) -> list[CommittedCheckpoint]:
        head = self._pending[0]
        if block:
            if not head.gathered:
                while not wait([head.upload], timeout=2.0).done:
                    self._warn_if_slow(head)
            elif head.commit is not None:
                wait([head.commit])
        flags = [0.0, 0.0, 0.0, 0.0]  # uploaded, upload failed, committed, commit failed
        if not head.gathered and head.upload.done():
            flags[1 if head.upload.exception() else 0] = 1.0
        if head.commit is not None and head.commit.done():
            flags[3 if head.commit.exception() else 2] = 1.0
        reduced = self._tensor(flags)
        self.all_reduce_sum(reduced)
        uploaded, upload_failed, committed, commit_failed = reduced.tolist()
        if upload_failed or commit_failed:
            self._fail(head)
        if not head.gathered:
            if uploaded < self.world_size:
                self._warn_if_slow(head)
                return []
            all_entries = self.gather(head.upload.result())
            head.gathered = True
            if all_entries is not None:
                head.commit = self._committer.submit(self._commit, head, all_entries)
            return []
        if not committed:
            return []
        self._pending.popleft()
        if head.commit is None:
            return []
        self.last = head.commit.result()
        if self.on_commit is not None:
            self.on_commit(self.last)
        return [self.last]

    def _warn_if_slow(self, head: _Pending) -> None:
        waited = time.monotonic() - head.submitted_at
        if head.warned or self.on_outage != "defer" or waited < self._budget_s:
            return
        head.warned = True
        log.warning(
            "The checkpoint at step %d has been uploading for %.0f s (storage slow or "
            "unreachable); training continues and it is committed once storage is back.",
            head.step,
            waited,
        )

    def _fail(self, head: _Pending) -> None:
        from forge.checkpoint.lock import LockLostError

        mine, lost = None, None
        for future in (head.upload, head.commit):
            if future is not None and future.done() and future.exception() is not None:
                mine = describe(future.exception())  # type: ignore[arg-type]
                if isinstance(future.exception(), LockLostError):
                    lost = future.exception()
        reasons = self.gather(mine)
        self.close(cancel=True)
        if lost is not None:  # not a storage outage: say what happened, not "storage is back"
            raise lost
        if reasons is None:
            raise CheckpointError(
                f"The checkpoint at step {head.step} was not saved"
                + (f": {mine}" if mine else " (it failed on another worker; see rank 0).")
            )
        text = "; ".join(f"rank {r}: {m}" for r, m in enumerate(reasons) if m)
        raise CheckpointError(
            f"The checkpoint at step {head.step} was not saved ({text}). Checkpoints committed "
            "before it are intact: resume with resume=auto once storage is back, or set "
            "storage.on_outage=defer to keep training through storage outages."
        )
