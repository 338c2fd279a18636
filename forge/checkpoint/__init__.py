"""The one checkpoint subsystem: every checkpoint byte forge writes or reads goes through here.

* ``storage``   — str URIs on fsspec (local paths, file://, memory://, s3://)
* ``serialize`` — tensors as safetensors, other state through ``torch.load(weights_only=True)``
* ``manifest``  — ``manifest.json``: each file's size and sha256; writing it *is* the commit
* ``store``     — save → commit → move the ``latest`` pointer → retention; find and verify on resume
* ``streamer``  — the same in the background: training waits only for the host-memory snapshot
* ``retry``     — the one place storage errors are classified (transient or not) and retried
* ``s3``        — concurrent multipart uploads and ranged downloads for ``s3://``
* ``lock``      — one run per run folder (``_forge.lock``, a conditional write)
"""

from typing import Any

from forge.checkpoint.storage import StorageOptions
from forge.checkpoint.store import CheckpointStore, CommittedCheckpoint

__all__ = ["CheckpointStore", "CommittedCheckpoint", "consolidate"]


def consolidate(uri: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """One full-precision state dict (``{name: tensor}``) from a checkpoint of any strategy and
    world size, for export and evaluation. See :func:`forge.strategies.fragments.consolidate`;
    ``options`` says how to reach remote storage (endpoint, region, retries)."""
    from forge.strategies.fragments import consolidate as _consolidate  # the sharded format

    return _consolidate(uri, options)
