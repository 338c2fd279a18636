"""``manifest.json``: the list of a checkpoint's files with size and sha256, written last.

A checkpoint folder without a manifest, or whose files do not match it, does not exist as far
as forge is concerned.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "forge-checkpoint/1"


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str

    @staticmethod
    def of(data: bytes | bytearray | memoryview) -> FileEntry:
        """The entry of a file's bytes (hashlib releases the GIL while it hashes them)."""
        return FileEntry(size=memoryview(data).nbytes, sha256=hashlib.sha256(data).hexdigest())

    @staticmethod
    def of_file(path: str, chunk: int = 1 << 24) -> FileEntry:
        """The entry of a local file, hashed in chunks (never held in memory whole)."""
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while data := f.read(chunk):
                digest.update(data)
                size += len(data)
        return FileEntry(size=size, sha256=digest.hexdigest())


@dataclass(frozen=True)
class Manifest:
    """What a committed checkpoint holds and where it came from.

    Example:
        >>> m = Manifest(step=10, world_size=2, strategy="ddp", files={"a": FileEntry.of(b"x")})
        >>> Manifest.from_json(m.to_json()).files["a"].size
        1
    """

    step: int
    world_size: int
    strategy: str
    files: dict[str, FileEntry]
    config_hash: str = ""
    git_sha: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # loop position: epoch, batch, ...
    data_fingerprint: dict[str, Any] | None = None  # forge.data: which data trained it
    created_at: float = field(default_factory=time.time)
    format: str = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> Manifest:
        raw = json.loads(data)
        if raw.get("format") != FORMAT:
            raise ValueError(f"unknown checkpoint format {raw.get('format')!r}")
        raw["files"] = {k: FileEntry(**v) for k, v in raw["files"].items()}
        return Manifest(**raw)
