"""Save, commit, find and verify checkpoints under a run folder.

Layout::

    <run>/checkpoints/step_00000100/{model.safetensors, optim.pt, rank0.pt, ..., manifest.json}
    <run>/checkpoints/latest.json      -> {"step": 100, "name": "step_00000100"}

Commit protocol: every rank writes its own files and hashes them as it writes; the hashes are
gathered on rank 0, which writes ``manifest.json`` (the commit) and *then* moves ``latest.json``
and applies retention. A crash before the manifest leaves a folder that readers ignore, and that
:meth:`CheckpointStore.clean_uncommitted` removes when the run next starts.

:meth:`CheckpointStore.save` does all of that synchronously; :mod:`forge.checkpoint.streamer`
runs the same two halves (:meth:`~CheckpointStore.write_files`, :meth:`~CheckpointStore.commit`)
in the background while training goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from forge.checkpoint import storage
from forge.checkpoint.manifest import MANIFEST, FileEntry, Manifest
from forge.checkpoint.retry import Cancelled, CancelSignal, EitherEvent
from forge.checkpoint.storage import Buffer, StorageOptions
from forge.checkpoint.threads import background_pool
from forge.errors import CheckpointError

log = logging.getLogger(__name__)

POINTER = "latest.json"
# Gathers one picklable object from every rank onto rank 0 (None elsewhere). Injected so the
# store works with torch.distributed, with another collective, or alone in a unit test.
GatherFn = Callable[[Any], "list[Any] | None"]
# A file's bytes, or a zero-argument callable producing them (run in the background).
Payload = Buffer | Callable[[], Buffer]
_FILE_CONCURRENCY = 4  # files of one rank written (or verified) at once


def _gather_alone(obj: Any) -> list[Any]:
    return [obj]


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A checkpoint whose manifest exists; file reads are checked against it."""

    uri: str
    manifest: Manifest
    options: StorageOptions | None = field(default=None, compare=False, repr=False)

    @property
    def step(self) -> int:
        return self.manifest.step

    def _entry(self, name: str) -> FileEntry:
        entry = self.manifest.files.get(name)
        if entry is None:
            raise CheckpointError(
                f"{self.uri} has no file {name!r} (it has {sorted(self.manifest.files)})."
            )
        return entry

    def read(self, name: str) -> bytes:
        """Read one file, verifying its size and sha256 against the manifest."""
        entry = self._entry(name)
        try:
            data = storage.read_bytes(storage.join(self.uri, name), self.options)
        except FileNotFoundError:
            raise CheckpointError(f"{self.uri}: {name} is missing.") from None
        _check(storage.join(self.uri, name), FileEntry.of(data), entry)
        return data

    def local_file(self, name: str, workdir: Callable[[], str]) -> str:
        """A verified file on this machine with ``name``'s bytes, for memory-mapped reads.

        On local storage that is the file itself (hashed in chunks, never held in memory);
        remote files are downloaded and verified once, then written into the folder that
        ``workdir()`` returns.
        """
        path = storage.local_path(storage.join(self.uri, name), self.options)
        if path is None:
            target = os.path.join(workdir(), name)
            with open(target, "wb") as f:
                f.write(self.read(name))
            return target
        entry = self._entry(name)
        try:
            actual = FileEntry.of_file(path)
        except FileNotFoundError:
            raise CheckpointError(f"{self.uri}: {name} is missing.") from None
        _check(path, actual, entry)
        return path

    def verify_sizes(self) -> None:
        """Check that every listed file exists with its size (one listing, no download)."""
        sizes = {e["name"]: e.get("size") for e in storage.list_dir(self.uri, self.options)}
        for name, entry in self.manifest.files.items():
            if name not in sizes:
                raise CheckpointError(f"{self.uri}: {name} is missing.")
            if sizes[name] != entry.size:
                raise CheckpointError(
                    f"{self.uri}: {name} is {sizes[name]} bytes, the manifest says {entry.size} "
                    "(truncated or partial upload)."
                )

    def verify(self) -> None:
        """Check every file listed in the manifest: sizes first, then sha256 (in parallel)."""
        self.verify_sizes()
        names = list(self.manifest.files)
        if not names:
            return
        with background_pool(min(_FILE_CONCURRENCY, len(names)), "forge-verify") as pool:
            for future in [pool.submit(self.read, name) for name in names]:
                future.result()


def _check(where: str, actual: FileEntry, expected: FileEntry) -> None:
    if actual != expected:
        raise CheckpointError(
            f"{where} does not match its manifest (size {actual.size} vs {expected.size}, or "
            "sha256 differs): the file is corrupt."
        )


def open_checkpoint(
    uri: str, verify: bool = True, options: StorageOptions | None = None
) -> CommittedCheckpoint:
    """Open a committed checkpoint folder, raising CheckpointError if it is not one."""
    uri = storage.normalize(uri)
    try:
        manifest = Manifest.from_json(storage.read_bytes(storage.join(uri, MANIFEST), options))
    except FileNotFoundError:
        raise CheckpointError(
            f"{uri} is not a committed checkpoint (no {MANIFEST}); it may be a partial save. "
            "Point resume= at a folder such as <run>/checkpoints/step_00000100, or use resume=auto."
        ) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{uri}/{MANIFEST} is unreadable ({exc}).") from None
    ckpt = CommittedCheckpoint(uri, manifest, options)
    if verify:
        ckpt.verify()
    return ckpt


class CheckpointStore:
    """The checkpoints of one run folder.

    Args:
        run_uri: The run folder; checkpoints go to ``<run_uri>/checkpoints``.
        keep_last: Committed checkpoints to keep (None keeps all). The newest is never deleted.
        monitor: Metric name; the best checkpoints by it are kept as well.
        mode: ``min`` or ``max`` for ``monitor``.
        keep_best: How many of the best checkpoints by ``monitor`` retention keeps (top-k).
        options: How to reach the storage (endpoint, region, retries).
        fence: Called right before each commit (and before cleaning up); raises to refuse it.
            Workers pass :func:`forge.checkpoint.lock.commit_fence`, so a run that lost its run
            lock, or whose driver is gone, commits nothing more.

    Example:
        >>> store = CheckpointStore("memory://doc/run", keep_last=1)
        >>> store.save(5, {"a.bin": b"hello"}, strategy="none").step
        5
        >>> store.latest().read("a.bin")
        b'hello'
    """

    def __init__(
        self,
        run_uri: str,
        keep_last: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        keep_best: int = 1,
        options: StorageOptions | None = None,
        fence: Callable[[], None] | None = None,
    ) -> None:
        self.run_uri = storage.normalize(run_uri)
        self.root = storage.join(self.run_uri, "checkpoints")
        self.keep_last = keep_last
        self.monitor = monitor
        self.mode = mode
        self.keep_best = keep_best
        self.options = options
        self.fence = fence

    def with_options(self, options: StorageOptions) -> CheckpointStore:
        """The same store, reached with other options (e.g. a more patient retry policy)."""
        return CheckpointStore(
            self.run_uri,
            self.keep_last,
            self.monitor,
            self.mode,
            self.keep_best,
            options,
            fence=self.fence,
        )

    def step_uri(self, step: int) -> str:
        """The folder of the checkpoint at ``step``, committed or not."""
        return storage.join(self.root, step_dir_name(step))

    # -- writing -------------------------------------------------------------------------------

    def write_files(
        self,
        step: int,
        files: Mapping[str, Payload],
        *,
        cancel: CancelSignal | None = None,
    ) -> dict[str, FileEntry]:
        """Write this rank's files of ``step`` (several at once) and return their entries.

        Callables are called here (serialization), each file is hashed and uploaded; nothing is
        committed. Safe to run in a background thread.
        """
        uri = self.step_uri(step)

        # A failed file stops this checkpoint's other files, and nothing else: ``cancel`` is the
        # caller's (the streamer's, shared by every checkpoint in flight), so setting it would
        # report an earlier checkpoint still uploading as "Cancelled" instead of its own fate.
        failed = threading.Event()
        stop = EitherEvent(failed, cancel)

        def one(name: str, payload: Payload) -> tuple[str, FileEntry]:
            if stop.is_set():
                raise Cancelled(f"write {storage.join(uri, name)}")
            data = payload() if callable(payload) else payload
            entry = _hasher().submit(FileEntry.of, data)  # sha256 while the bytes go up
            storage.write_bytes(storage.join(uri, name), data, self.options, cancel=stop)
            return name, entry.result()

        items = list(files.items())
        if len(items) <= 1:
            return dict(one(n, p) for n, p in items)
        with background_pool(min(_FILE_CONCURRENCY, len(items)), "forge-write") as pool:
            futures = [pool.submit(one, n, p) for n, p in items]
            try:
                return dict(f.result() for f in futures)
            except BaseException:
                failed.set()
                # A file cancelled because another one failed is not the cause: raise the
                # failure itself, so the error names what went wrong with storage.
                for f in futures:
                    exc = f.exception()
                    if exc is not None and not isinstance(exc, Cancelled):
                        raise exc from None
                raise

    def commit(
        self,
        step: int,
        all_entries: list[dict[str, FileEntry]],
        *,
        world_size: int = 1,
        strategy: str,
        metrics: dict[str, float] | None = None,
        state: dict[str, Any] | None = None,
        config_hash: str = "",
        git_sha: str | None = None,
        data_fingerprint: dict[str, Any] | None = None,
    ) -> CommittedCheckpoint:
        """On rank 0, once every rank's files have landed: manifest, pointer, retention."""
        merged: dict[str, FileEntry] = {}
        for rank_entries in all_entries:
            overlap = merged.keys() & rank_entries.keys()
            if overlap:
                raise CheckpointError(
                    f"two ranks wrote the same checkpoint files: {sorted(overlap)}"
                )
            merged.update(rank_entries)
        manifest = Manifest(
            step=step,
            world_size=world_size,
            strategy=strategy,
            files=merged,
            config_hash=config_hash,
            git_sha=git_sha,
            metrics=dict(metrics or {}),
            state=dict(state or {}),
            data_fingerprint=data_fingerprint,
        )
        uri = self.step_uri(step)
        if self.fence is not None:  # the manifest is the commit: nothing before it is visible
            self.fence()
        storage.write_bytes(storage.join(uri, MANIFEST), manifest.to_json(), self.options)
        pointer = {"step": step, "name": step_dir_name(step)}
        storage.write_bytes(
            storage.join(self.root, POINTER), json.dumps(pointer).encode(), self.options
        )
        self.apply_retention()  # only now: the pointer no longer names anything it may delete
        return CommittedCheckpoint(uri, manifest, self.options)

    def save(
        self,
        step: int,
        files: Mapping[str, Payload],
        *,
        rank: int = 0,
        world_size: int = 1,
        gather: GatherFn = _gather_alone,
        strategy: str,
        metrics: dict[str, float] | None = None,
        state: dict[str, Any] | None = None,
        config_hash: str = "",
        git_sha: str | None = None,
        data_fingerprint: dict[str, Any] | None = None,
    ) -> CommittedCheckpoint | None:
        """Write this rank's ``files``, then commit on rank 0. Call on every rank.

        Synchronous; :class:`forge.checkpoint.streamer.CheckpointStreamer` is the background
        version. Returns the committed checkpoint on rank 0, None on other ranks.
        """
        entries = self.write_files(step, files)
        all_entries = gather(entries)  # also the barrier: rank 0 continues once all have written
        if all_entries is None:
            return None
        return self.commit(
            step,
            all_entries,
            world_size=world_size,
            strategy=strategy,
            metrics=metrics,
            state=state,
            config_hash=config_hash,
            git_sha=git_sha,
            data_fingerprint=data_fingerprint,
        )

    def apply_retention(self) -> list[str]:
        """Delete committed checkpoints beyond ``keep_last`` (never the newest, nor the best k)."""
        if self.keep_last is None:
            return []
        committed = self.committed()
        if not committed:
            return []
        keep = {c.uri for c in committed[-self.keep_last :]} | {committed[-1].uri}
        keep |= {c.uri for c in self.top(self.keep_best, committed)}
        deleted = []
        for ckpt in committed:
            if ckpt.uri not in keep:
                storage.remove(ckpt.uri, self.options)
                deleted.append(ckpt.uri)
        return deleted

    def uncommit(self, uri: str) -> None:
        """Take back the commit of the checkpoint at ``uri`` (its manifest); files stay until
        :meth:`clean_uncommitted`. For a checkpoint that cannot be loaded and whose step this
        run will save again: without it, the new files would sit under the old manifest until
        the new one replaced it."""
        storage.remove(storage.join(uri, MANIFEST), self.options)

    def clean_uncommitted(self) -> list[str]:
        """Remove what crashed saves left behind: step folders without a manifest, and (S3)
        unfinished multipart uploads. Call only while no rank of this run is writing."""
        if self.fence is not None:  # another run's uploads in flight are not leftovers
            self.fence()
        aborted = storage.abort_uploads(self.root, self.options)
        if aborted:
            log.info("Aborted %d unfinished multipart upload(s) under %s", aborted, self.root)
        removed = []
        committed = {c.uri for c in self.committed()}
        for entry in storage.list_dir(self.root, self.options):
            uri = storage.join(self.root, entry["name"])
            if entry["type"] == "directory" and entry["name"].startswith("step_"):
                if uri not in committed:
                    storage.remove(uri, self.options)
                    removed.append(uri)
        return removed

    # -- reading -------------------------------------------------------------------------------

    def committed(self) -> list[CommittedCheckpoint]:
        """Checkpoints with a readable manifest, oldest first (files not verified)."""
        found = []
        for entry in storage.list_dir(self.root, self.options):
            if entry["type"] != "directory" or not entry["name"].startswith("step_"):
                continue
            uri = storage.join(self.root, entry["name"])
            try:
                found.append(open_checkpoint(uri, verify=False, options=self.options))
            except CheckpointError:
                continue  # never committed: a crash mid-save, invisible by design
        return sorted(found, key=lambda c: c.step)

    def latest(self, verify: bool = True) -> CommittedCheckpoint | None:
        """The newest committed checkpoint that verifies; corrupt ones are skipped, warned of."""
        for ckpt in reversed(self.committed()):
            if not verify:
                return ckpt
            try:
                ckpt.verify()
                return ckpt
            except CheckpointError as exc:
                _warn_skip(ckpt, exc)
        return None

    def candidates(self) -> list[CommittedCheckpoint]:
        """Committed checkpoints, newest first, whose files all exist with the right sizes.

        Cheap (a listing per checkpoint, no download); sha256 is checked as files are read.
        Truncated or partial ones are skipped with a warning naming them.
        """
        out = []
        for ckpt in reversed(self.committed()):
            try:
                ckpt.verify_sizes()
                out.append(ckpt)
            except CheckpointError as exc:
                _warn_skip(ckpt, exc)
        return out

    def top(
        self, k: int, committed: list[CommittedCheckpoint] | None = None
    ) -> list[CommittedCheckpoint]:
        """The ``k`` best committed checkpoints by ``monitor``, best first ([] without one).

        Only checkpoints whose ``monitor`` value is a finite number rank: a NaN compares false
        with everything, so a plain sort would put it anywhere (even first), and an inf loss
        is a diverged model, not the best one.
        """
        if self.monitor is None or k <= 0:
            return []
        scored = [
            (value, c)
            for c in (committed or self.committed())
            if (value := rank_value(c.manifest.metrics, self.monitor)) is not None
        ]
        scored.sort(key=lambda pair: pair[0], reverse=self.mode == "max")
        return [c for _, c in scored[:k]]

    def best(
        self, committed: list[CommittedCheckpoint] | None = None
    ) -> CommittedCheckpoint | None:
        """The committed checkpoint with the best ``monitor`` metric, if one is configured."""
        top = self.top(1, committed)
        return top[0] if top else None


def rank_value(metrics: Mapping[str, Any], monitor: str) -> float | None:
    """``metrics[monitor]`` if it can rank (a finite number), else None.

    The one rule for every choice of a "best" by a metric (retention, ``best_checkpoint``):
    a missing, non-numeric or non-finite value never ranks.

    Example:
        >>> rank_value({"val/loss": 0.3}, "val/loss")
        0.3
        >>> rank_value({"val/loss": float("nan")}, "val/loss") is None
        True
    """
    value = metrics.get(monitor)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()


def _hasher() -> ThreadPoolExecutor:
    """Threads that hash files while they upload (hashlib releases the GIL)."""
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None:
            _hash_pool = background_pool(_FILE_CONCURRENCY, "forge-sha")
        return _hash_pool


def _warn_skip(ckpt: CommittedCheckpoint, exc: Exception) -> None:
    log.warning("Skipping checkpoint %s: %s Falling back to the one before.", ckpt.uri, exc)
