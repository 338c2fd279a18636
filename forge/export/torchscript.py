"""``torchscript`` (legacy; PyTorch deprecated TorchScript): ``torch.jit.trace`` to
``model.torchscript.pt``. Not in the default formats. Loading unpickles, so forge loads it
only after its sha256 matched the export manifest."""

from __future__ import annotations

import os
import warnings
from typing import Any

from forge.export.artifact import Runner, Written, format_error, torch_runner
from forge.recipe import ExportSpec

FILE = "model.torchscript.pt"


def write(
    model: Any, spec: ExportSpec, example: tuple[Any, ...], settings: Any, workdir: str
) -> Written:
    """Trace ``model`` on the example batch and save it.

    Raises:
        FormatError: Tracing fails (the op is named when known).
    """
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings and the deprecation notice
            traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(os.path.join(workdir, FILE))
    except Exception as exc:
        raise format_error("torchscript", exc) from exc
    return Written(files=[FILE], info={"legacy": True})


def runtimes(workdir: str, spec: ExportSpec) -> dict[str, Runner]:
    """The loaded ScriptModule as a runner (call only on a verified file)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(os.path.join(workdir, FILE), map_location="cpu")
    return {"torchscript": torch_runner(module.eval())}
