"""Export a committed checkpoint to serving formats, behind a fatal parity gate.

* ``source``       — verify the checkpoint, read the run's config as data, rebuild the model
* ``onnx`` / ``torch_export`` / ``safetensors`` / ``torchscript`` — one file per format
* ``parity``       — golden batches, per-output differences, task agreement, latency
* ``card``         — the model card (README.md with YAML front matter)
* ``folder``       — the export folder: files first, ``manifest.json`` last; verified reads
* ``core``         — :func:`export`, which runs all of it in that order
* ``cli``          — ``python -m forge export checkpoint=<uri> export.formats=[...]``

``forge.export(...)`` works whether ``forge.export`` resolves to this package or to the
function: the package itself is callable (see the bottom of this file).
"""

from __future__ import annotations

import shutil
import sys
import types
from typing import Any

from forge.checkpoint.storage import StorageOptions
from forge.export.core import ExportError, ExportResult, export
from forge.export.settings import ExportSettings

__all__ = ["ExportError", "ExportResult", "ExportSettings", "export", "load_verified"]

_FILES = {
    "onnx": None,  # model.onnx and its external data, as listed in the manifest
    "torch_export": ["model.pt2"],
    "safetensors": ["model.safetensors", "config.json"],
    "torchscript": ["model.torchscript.pt"],
}


def load_verified(uri: str, fmt: str, options: StorageOptions | None = None) -> Any:
    """Load one format of a committed export, after checking its files against the manifest.

    Every file is read, its size and sha256 compared with ``manifest.json``, and only then
    handed to the format's loader (``.pt2`` and TorchScript loaders unpickle).

    Args:
        uri: The export folder (local or ``s3://``).
        fmt: ``onnx`` (returns an ``onnxruntime.InferenceSession``), ``torch_export``,
            ``safetensors`` (rebuilt with the recipe named in ``config.json``) or
            ``torchscript`` (each returns a callable ``torch.nn.Module`` in eval mode).
        options: How to reach remote storage.

    Raises:
        CheckpointError: The folder is not a committed export, the format is not ``ok`` in it,
            or a file does not match the manifest.

    Example:
        >>> model = load_verified("runs/x/exports/step_00000300", "torch_export")  # doctest: +SKIP
    """
    import json
    import os

    from forge.errors import CheckpointError
    from forge.export import folder

    manifest = folder.read_manifest(uri, options)
    record = manifest.get("formats", {}).get(fmt)
    if record is None or record.get("status") != "ok":
        status = "absent" if record is None else record.get("status")
        raise CheckpointError(f"{uri}: format {fmt!r} is {status} in this export; not loading it.")
    names = record["files"] if _FILES.get(fmt) is None else _FILES[fmt]
    local, _ = folder.verified_copy(uri, names, options)
    try:
        if fmt == "onnx":
            from forge.export.onnx import FILE, session

            return session(os.path.join(local, FILE), optimize=True)
        if fmt == "torch_export":
            import torch

            return torch.export.load(os.path.join(local, "model.pt2")).module()
        if fmt == "torchscript":
            import torch

            from forge.export.torchscript import FILE as TS_FILE

            return torch.jit.load(os.path.join(local, TS_FILE), map_location="cpu").eval()
        if fmt == "safetensors":
            from forge.export.safetensors import load_into
            from forge.export.source import recipe_builders

            with open(os.path.join(local, "config.json")) as f:
                recipe = json.load(f)["recipe"]
            build, _ = recipe_builders(recipe)
            return load_into(build(), local)
        raise CheckpointError(f"unknown export format {fmt!r}")
    finally:
        shutil.rmtree(local, ignore_errors=True)


class _CallablePackage(types.ModuleType):
    """``import forge.export`` binds this package as ``forge.export``; calling it exports."""

    def __call__(self, *args: Any, **kwargs: Any) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
