"""The data fingerprint: which data a run saw, in ``run.json`` and in every checkpoint manifest.

For files: the source URI, each file's path, size and version (the S3 ETag, or the local
mtime), the format and the row count; changing, adding or removing a file changes it. For a
recipe's in-memory data: a sha256 over the training tensors' bytes, in order, and the row count.
``sha256`` (over everything else, canonical JSON) is the one value to compare; the profile's
``fingerprint`` field holds it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any


def _sealed(doc: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()
    return {**doc, "sha256": hashlib.sha256(body).hexdigest()}


def files_fingerprint(
    source: str,
    files: Sequence[Any],
    rows: int,
    fmt: str,
    val: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The fingerprint of a file source.

    Args:
        source: ``data.source`` as given (normalized).
        files: :class:`forge.data.source.SourceFile` entries (path, size, version).
        rows: Rows in all the files (before the val split and before any dropped rows).
        fmt: ``parquet`` or ``csv``.
        val: The fingerprint of ``data.val_source`` (same shape), if any.

    Example:
        >>> from forge.data.source import SourceFile
        >>> a = files_fingerprint("d", [SourceFile("d/a.parquet", 10, "mtime:1")], 5, "parquet")
        >>> b = files_fingerprint("d", [SourceFile("d/a.parquet", 10, "mtime:2")], 5, "parquet")
        >>> a["sha256"] == b["sha256"], a["rows"]
        (False, 5)
    """
    return _sealed(
        {
            "kind": "files",
            "source": source,
            "format": fmt,
            "files": [{"path": f.path, "size": f.size, "version": f.version} for f in files],
            "rows": rows,
            "val": val,
        }
    )


def memory_fingerprint(source: str, content_sha256: str, rows: int) -> dict[str, Any]:
    """The fingerprint of a recipe's in-memory training data.

    Example:
        >>> memory_fingerprint("recipe:tabular", "ab", 3)["kind"]
        'memory'
    """
    return _sealed(
        {"kind": "memory", "source": source, "content_sha256": content_sha256, "rows": rows}
    )
