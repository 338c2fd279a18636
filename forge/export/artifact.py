"""What every format module shares: the runner type, dynamic shapes, and how failures read."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forge.recipe import ExportSpec

# A loaded artifact: inputs (one array per input name) -> outputs (one array per output name).
Runner = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


@dataclass
class Written:
    """The files one format wrote into the staging folder, and facts for the manifest."""

    files: list[str]
    info: dict[str, Any] = field(default_factory=dict)


class FormatError(Exception):
    """A format cannot express the model; ``op`` names the operator when one is to blame."""

    def __init__(self, fmt: str, detail: str, op: str | None = None) -> None:
        self.fmt, self.detail, self.op = fmt, detail, op
        what = f"the operator {op}" if op else "the model"
        super().__init__(f"{fmt} cannot express {what}: {detail}")


_OP = re.compile(r"\b(aten(?:::|\.)[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_]+)?)")


def format_error(fmt: str, exc: BaseException) -> FormatError:
    """A :class:`FormatError` from an exporter's exception, naming the first aten op it cites."""
    texts, seen = [], exc
    while seen is not None and len(texts) < 5:
        texts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(texts)
    match = _OP.search(text)
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return FormatError(fmt, first[:400], match.group(1) if match else None)


def torch_dynamic_shapes(spec: ExportSpec) -> tuple[dict[int, Any] | None, ...]:
    """``dynamic_shapes`` for ``torch.export`` / ``torch.onnx.export``, one entry per input.

    A named dim is the same :class:`torch.export.Dim` wherever it appears (every input shares
    ``batch``); ``max_dims`` bounds it (tinylm's ``seq`` <= block_size).
    """
    from torch.export import Dim

    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        if name not in dims:
            bound = spec.max_dims.get(name)
            dims[name] = Dim(name, min=1, max=bound) if bound else Dim(name, min=1)
        return dims[name]

    return tuple(
        {axis: dim(n) for axis, n in spec.dynamic_dims.get(name, {}).items()} or None
        for name in spec.input_names
    )


def as_outputs(value: Any) -> list[np.ndarray]:
    """A model's output (a tensor, or a tuple/list of them) as a list of float arrays."""
    import torch

    items = value if isinstance(value, (tuple, list)) else [value]
    return [
        t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in items
    ]


def torch_runner(module: Any) -> Runner:
    """A runner for any torch callable (eager model, ExportedProgram module, ScriptModule)."""
    import torch

    def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            return as_outputs(module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs)))

    return run
