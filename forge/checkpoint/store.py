"""Save, commit, find and verify checkpoints under a run folder.

Layout::

    <run>/checkpoints/step_00000100/{model.safetensors, optim.pt, rank0.pt, ..., manifest.json}
    <run>/checkpoints/latest.json      -> {"step": 100, "name": "step_00000100"}

Commit protocol: every rank writes its own files and hashes them as it writes; the hashes are
gathered on rank 0, which writes ``manifest.json`` (the commit) and *then* moves ``latest.json``
and applies retention. A crash before the manifest leaves a folder that readers ignore.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forge.checkpoint import storage
from forge.checkpoint.manifest import MANIFEST, FileEntry, Manifest
from forge.errors import CheckpointError

log = logging.getLogger(__name__)

POINTER = "latest.json"
# Gathers one picklable object from every rank onto rank 0 (None elsewhere). Injected so the
# store works with torch.distributed, with another collective, or alone in a unit test.
GatherFn = Callable[[Any], "list[Any] | None"]


def _gather_alone(obj: Any) -> list[Any]:
    return [obj]


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A checkpoint whose manifest exists; file reads are checked against it."""

    uri: str
    manifest: Manifest

    @property
    def step(self) -> int:
        return self.manifest.step

    def read(self, name: str) -> bytes:
        """Read one file, verifying its size and sha256 against the manifest."""
        entry = self.manifest.files.get(name)
        if entry is None:
            raise CheckpointError(
                f"{self.uri} has no file {name!r} (it has {sorted(self.manifest.files)})."
            )
        data = storage.read_bytes(storage.join(self.uri, name))
        if FileEntry.of(data) != entry:
            raise CheckpointError(
                f"{storage.join(self.uri, name)} does not match its manifest "
                f"(size {len(data)} vs {entry.size}, or sha256 differs): the file is corrupt."
            )
        return data

    def verify(self) -> None:
        """Check every file listed in the manifest (sizes first, as that needs no download)."""
        for name, entry in self.manifest.files.items():
            fs, path = storage.filesystem(storage.join(self.uri, name))
            try:
                size = fs.size(path)
            except FileNotFoundError:
                raise CheckpointError(f"{self.uri}: {name} is missing.") from None
            if size != entry.size:
                raise CheckpointError(
                    f"{self.uri}: {name} is {size} bytes, the manifest says {entry.size} "
                    "(truncated or partial upload)."
                )
        for name in self.manifest.files:
            self.read(name)


def open_checkpoint(uri: str, verify: bool = True) -> CommittedCheckpoint:
    """Open a committed checkpoint folder, raising CheckpointError if it is not one."""
    uri = storage.normalize(uri)
    try:
        manifest = Manifest.from_json(storage.read_bytes(storage.join(uri, MANIFEST)))
    except FileNotFoundError:
        raise CheckpointError(
            f"{uri} is not a committed checkpoint (no {MANIFEST}); it may be a partial save. "
            "Point resume= at a folder such as <run>/checkpoints/step_00000100, or use resume=auto."
        ) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{uri}/{MANIFEST} is unreadable ({exc}).") from None
    ckpt = CommittedCheckpoint(uri, manifest)
    if verify:
        ckpt.verify()
    return ckpt


class CheckpointStore:
    """The checkpoints of one run folder.

    Args:
        run_uri: The run folder; checkpoints go to ``<run_uri>/checkpoints``.
        keep_last: Committed checkpoints to keep (None keeps all). The newest is never deleted.
        monitor: Metric name; the best checkpoint by it is kept as well.
        mode: ``min`` or ``max`` for ``monitor``.

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
    ) -> None:
        self.root = storage.join(storage.normalize(run_uri), "checkpoints")
        self.keep_last = keep_last
        self.monitor = monitor
        self.mode = mode

    # -- writing -------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        files: dict[str, bytes],
        *,
        rank: int = 0,
        world_size: int = 1,
        gather: GatherFn = _gather_alone,
        strategy: str,
        metrics: dict[str, float] | None = None,
        state: dict[str, Any] | None = None,
        config_hash: str = "",
        git_sha: str | None = None,
    ) -> CommittedCheckpoint | None:
        """Write this rank's ``files``, then commit on rank 0. Call on every rank.

        Returns the committed checkpoint on rank 0, None on other ranks.
        """
        uri = storage.join(self.root, step_dir_name(step))
        entries = {}
        for name, data in files.items():
            storage.write_bytes(storage.join(uri, name), data)
            entries[name] = FileEntry.of(data)
        all_entries = gather(entries)  # also the barrier: rank 0 continues once all have written
        if all_entries is None:
            return None
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
        )
        storage.write_bytes(storage.join(uri, MANIFEST), manifest.to_json())  # the commit
        pointer = {"step": step, "name": step_dir_name(step)}
        storage.write_bytes(storage.join(self.root, POINTER), json.dumps(pointer).encode())
        self.apply_retention()
        return CommittedCheckpoint(uri, manifest)

    def apply_retention(self) -> list[str]:
        """Delete committed checkpoints beyond ``keep_last`` (never the newest, nor the best)."""
        if self.keep_last is None:
            return []
        committed = self.committed()
        if not committed:
            return []
        keep = {c.uri for c in committed[-self.keep_last :]} | {committed[-1].uri}
        best = self.best(committed)
        if best is not None:
            keep.add(best.uri)
        deleted = []
        for ckpt in committed:
            if ckpt.uri not in keep:
                storage.remove(ckpt.uri)
                deleted.append(ckpt.uri)
        return deleted

    # -- reading -------------------------------------------------------------------------------

    def committed(self) -> list[CommittedCheckpoint]:
        """Checkpoints with a readable manifest, oldest first (files not verified)."""
        found = []
        for entry in storage.list_dir(self.root):
            if entry["type"] != "directory" or not entry["name"].startswith("step_"):
                continue
            uri = storage.join(self.root, entry["name"])
            try:
                found.append(open_checkpoint(uri, verify=False))
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
                log.warning(
                    "Skipping checkpoint %s: %s Falling back to the one before.", ckpt.uri, exc
                )
        return None

    def best(
        self, committed: list[CommittedCheckpoint] | None = None
    ) -> CommittedCheckpoint | None:
        """The committed checkpoint with the best ``monitor`` metric, if one is configured."""
        if self.monitor is None:
            return None
        scored = [c for c in (committed or self.committed()) if self.monitor in c.manifest.metrics]
        if not scored:
            return None
        pick = min if self.mode == "min" else max
        return pick(scored, key=lambda c: c.manifest.metrics[self.monitor])  # type: ignore[index]
