"""``onnx``: ``torch.onnx.export(dynamo=True)`` with dynamic dims, checked by ``onnx.checker``,
run by ONNX Runtime's CPU provider both without graph optimizations and with all of them
(fusions change numerics, so the gate checks both)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from forge.export.artifact import Runner, Written, format_error, torch_dynamic_shapes
from forge.recipe import ExportSpec

FILE = "model.onnx"
MiB = 2**20


def write(
    model: Any, spec: ExportSpec, example: tuple[Any, ...], settings: Any, workdir: str
) -> Written:
    """Export ``model`` to ``workdir/model.onnx`` (+ ``model.onnx.data`` for large weights).

    Raises:
        FormatError: The exporter cannot express the model (the op is named when known).
    """
    import onnx
    import torch

    path = os.path.join(workdir, FILE)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = weight_bytes > settings.onnx_external_data_mb * MiB
    try:
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            dynamic_shapes=torch_dynamic_shapes(spec),
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            opset_version=settings.opset,
            verbose=False,
        )
        program.save(path, external_data=external)
        onnx.checker.check_model(path, full_check=True)  # by path: external data is followed
    except Exception as exc:
        raise format_error("onnx", exc) from exc
    proto = onnx.load(path, load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    files = sorted(f for f in os.listdir(workdir) if f.startswith(FILE))
    return Written(files=files, info={"opset": opset, "external_data": external})


def session(path: str, optimize: bool, threads: int | None = None) -> Any:
    """An ORT CPU ``InferenceSession``; ``optimize`` picks ORT_ENABLE_ALL over ORT_DISABLE_ALL."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def runtimes(workdir: str, spec: ExportSpec, threads: int | None = None) -> dict[str, Runner]:
    """``onnx[no-opt]`` and ``onnx[all]`` runners of ``workdir/model.onnx``."""
    path = os.path.join(workdir, FILE)
    out: dict[str, Runner] = {}
    for name, optimize in (("onnx[no-opt]", False), ("onnx[all]", True)):
        sess = session(path, optimize, threads)

        def run(inputs: Sequence[np.ndarray], sess: Any = sess) -> list[np.ndarray]:
            return sess.run(
                list(spec.output_names), dict(zip(spec.input_names, inputs, strict=True))
            )

        out[name] = run
    return out
