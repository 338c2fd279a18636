"""The export folder: files first, ``manifest.json`` last (the commit), as for checkpoints.

Readers trust only what the manifest vouches for: :func:`verified_copy` checks every file's
size and sha256 against the committed manifest *before* anything is loaded, which matters for
``.pt2`` and TorchScript files (their loaders unpickle).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from forge.checkpoint import storage
from forge.checkpoint.manifest import MANIFEST, FileEntry
from forge.checkpoint.storage import StorageOptions
from forge.errors import CheckpointError, ConfigError

FORMAT = "forge.export"
VERSION = 1


def prepare(out_uri: str, overwrite: bool, options: StorageOptions | None = None) -> None:
    """Make ``out_uri`` ready for a new export: refuse a committed one unless ``overwrite``.

    With ``overwrite`` the old manifest goes first (so no reader trusts a half-replaced
    folder), then the rest of the folder.
    """
    manifest = storage.join(out_uri, MANIFEST)
    if storage.exists(manifest, options):
        if not overwrite:
            raise ConfigError(
                f"export.out={out_uri} already holds a committed export. Choose another "
                "export.out, or set export.overwrite=true to replace it."
            )
        storage.remove(manifest, options)
    if storage.exists(out_uri, options):
        storage.remove(out_uri, options)


def commit(
    out_uri: str,
    staging: str,
    files: list[str],
    manifest: dict[str, Any],
    options: StorageOptions | None = None,
) -> dict[str, Any]:
    """Upload ``files`` from ``staging``, then write ``manifest.json`` with their entries.

    Returns:
        The manifest as written (with ``files`` filled in).
    """
    entries = {}
    for name in files:
        with open(os.path.join(staging, name), "rb") as f:
            data = f.read()
        entries[name] = FileEntry.of(data).__dict__
        storage.write_bytes(storage.join(out_uri, name), data, options)
    manifest = {"format": FORMAT, "version": VERSION, **manifest, "files": entries}
    storage.write_bytes(
        storage.join(out_uri, MANIFEST),
        json.dumps(manifest, indent=1, sort_keys=True, default=str).encode(),
        options,
    )
    return manifest


def read_manifest(uri: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """The committed manifest of an export folder.

    Raises:
        CheckpointError: No manifest (not committed), or a format/version forge does not know.
    """
    uri = storage.normalize(uri)
    try:
        manifest = json.loads(storage.read_bytes(storage.join(uri, MANIFEST), options))
    except FileNotFoundError:
        raise CheckpointError(f"{uri} is not a committed export (no {MANIFEST}).") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{uri}/{MANIFEST}: format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}; this forge reads {FORMAT!r} version {VERSION}."
        )
    return manifest


def check_local(path: str, expected: dict[str, Any]) -> None:
    """Refuse a local file whose size or sha256 differs from ``expected`` (a manifest entry)."""
    actual = FileEntry.of_file(path)
    if actual.size != expected["size"] or actual.sha256 != expected["sha256"]:
        raise CheckpointError(
            f"{path} does not match the export manifest (size {actual.size} vs "
            f"{expected['size']}, or sha256 differs): refusing to load it."
        )


def verified_copy(
    uri: str, names: list[str], options: StorageOptions | None = None
) -> tuple[str, dict[str, Any]]:
    """Copy ``names`` of a committed export into a new local folder, each checked against the
    manifest as it is read, so what is loaded afterwards is exactly what the manifest vouches
    for. Returns ``(folder, manifest)``; the caller deletes the folder."""
    uri = storage.normalize(uri)
    manifest = read_manifest(uri, options)
    target = tempfile.mkdtemp(prefix="forge-export-")
    for name in names:
        entry = manifest["files"].get(name)
        if entry is None:
            raise CheckpointError(f"{uri}: the export manifest lists no {name}.")
        data = storage.read_bytes(storage.join(uri, name), options)
        actual = FileEntry.of(data)
        if actual.size != entry["size"] or actual.sha256 != entry["sha256"]:
            raise CheckpointError(
                f"{uri}/{name} does not match the export manifest (size {actual.size} vs "
                f"{entry['size']}, or sha256 differs): refusing to load it."
            )
        with open(os.path.join(target, name), "wb") as f:
            f.write(data)
    return target, manifest
