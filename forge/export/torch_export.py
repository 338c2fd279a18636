"""``torch_export``: a ``torch.export`` ExportedProgram saved as ``model.pt2``.

``torch.export.load`` unpickles, so forge loads a ``.pt2`` only after its sha256 matched the
export manifest (see :func:`forge.export.folder.verified_dir`)."""

from __future__ import annotations

import os
from typing import Any

from forge.export.artifact import Runner, Written, format_error, torch_dynamic_shapes, torch_runner
from forge.recipe import ExportSpec

FILE = "model.pt2"


def write(
    model: Any, spec: ExportSpec, example: tuple[Any, ...], settings: Any, workdir: str
) -> Written:
    """Export ``model`` with dynamic dims and save the program.

    Raises:
        FormatError: ``torch.export`` cannot trace the model (the op is named when known).
    """
    import torch

    try:
        program = torch.export.export(model, example, dynamic_shapes=torch_dynamic_shapes(spec))
        torch.export.save(program, os.path.join(workdir, FILE))
    except Exception as exc:
        raise format_error("torch_export", exc) from exc
    return Written(files=[FILE])


def runtimes(workdir: str, spec: ExportSpec) -> dict[str, Runner]:
    """The loaded program's module as a runner (call only on a verified file)."""
    import torch

    program = torch.export.load(os.path.join(workdir, FILE))
    return {"torch_export": torch_runner(program.module())}
