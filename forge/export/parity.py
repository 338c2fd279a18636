"""The parity gate: every artifact, loaded by its own runtime, against the eager fp32 model.

Golden cases are validation rows at batch sizes 1, the export size and a larger one (and, for
sequence models, two lengths). Per case and output the gate records the max absolute and max
relative difference and passes an output when ``|actual - eager| <= atol + rtol * |eager|``
elementwise (numpy's ``allclose``; HF Optimum's validation uses the same rule but only warns).
It also checks the task: the argmax of the last dim (the class; for a language model the next
token at every position) must agree wherever the eager model's top two differ by more than the
tolerance lets either move (closer ones are ties that any fp32 reordering may flip).
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from forge.export.artifact import Runner, as_outputs
from forge.export.settings import ExportSettings, Tolerance
from forge.recipe import ExportSpec

GOLDEN = "golden.npz"


@dataclass
class Case:
    """One golden batch: inputs and the eager model's outputs, by name."""

    name: str
    inputs: list[np.ndarray]
    expected: list[np.ndarray]


def golden_cases(model: Any, spec: ExportSpec, settings: ExportSettings) -> list[Case]:
    """The golden batches and the eager model's outputs on them (no grad, eval, fp32)."""
    import torch

    seq_names = sorted({n for d in spec.dynamic_dims.values() for n in d.values()} - {"batch"})
    cases = []
    for size in settings.parity_sizes():
        full = [t.detach().cpu() for t in spec.example(size)]
        variants: list[tuple[str, list[torch.Tensor]]] = [(f"b{size}", full)]
        for dim_name in seq_names:
            lengths = _lengths(full, spec, dim_name, settings)
            variants = [
                (f"b{size}_{dim_name}{n}", _narrow(full, spec, dim_name, n)) for n in lengths
            ]
        for name, tensors in variants:
            with torch.inference_mode():
                expected = as_outputs(model(*tensors))
            inputs = [t.numpy().copy() for t in tensors]
            cases.append(Case(name, inputs, expected))
    return cases


def _lengths(
    tensors: list[Any], spec: ExportSpec, dim_name: str, settings: ExportSettings
) -> list[int]:
    full = next(
        t.shape[axis]
        for t, name in zip(tensors, spec.input_names, strict=True)
        for axis, n in spec.dynamic_dims.get(name, {}).items()
        if n == dim_name
    )
    wanted = settings.parity_seq_lens or [full, max(1, full // 2)]
    return sorted({min(n, full) for n in wanted}, reverse=True)


def _narrow(tensors: list[Any], spec: ExportSpec, dim_name: str, n: int) -> list[Any]:
    out = []
    for t, name in zip(tensors, spec.input_names, strict=True):
        for axis, d in spec.dynamic_dims.get(name, {}).items():
            if d == dim_name:
                t = t.narrow(axis, 0, n)
        out.append(t.contiguous())
    return out


def save_golden(cases: Sequence[Case], spec: ExportSpec, path: str) -> None:
    """``golden.npz``: ``<case>/input/<name>`` and ``<case>/output/<name>`` arrays."""
    arrays = {}
    for case in cases:
        for name, value in zip(spec.input_names, case.inputs, strict=True):
            arrays[f"{case.name}/input/{name}"] = value
        for name, value in zip(spec.output_names, case.expected, strict=True):
            arrays[f"{case.name}/output/{name}"] = value
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


@dataclass
class Row:
    """One output of one case under one runtime."""

    runtime: str
    case: str
    output: str
    max_abs: float
    max_rel: float
    agreement: float | None  # task-level argmax agreement on decisive positions; None: n/a
    ok: bool
    error: str | None = None


def compare(
    actual: np.ndarray, expected: np.ndarray, tol: Tolerance, task: str
) -> tuple[float, float, float | None, bool]:
    """``(max_abs, max_rel, agreement, ok)`` of one output against the eager one.

    Example:
        >>> e = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
        >>> compare(e + 1e-7, e, Tolerance(), "classification")[2:]
        (1.0, True)
        >>> compare(e[:, ::-1], e, Tolerance(), "classification")[2:]
        (0.0, False)
    """
    if actual.shape != expected.shape:
        return float("inf"), float("inf"), None, False
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    diff = np.abs(a - e)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = (
        float((diff / np.maximum(np.abs(e), np.finfo(np.float32).tiny)).max()) if diff.size else 0.0
    )
    close = bool(np.all(diff <= tol.atol + tol.rtol * np.abs(e))) and bool(
        np.isfinite(a).all() == np.isfinite(e).all()
    )
    agreement = None
    if task in ("classification", "next_token") and e.ndim >= 1 and e.shape[-1] > 1:
        top2 = np.sort(e, axis=-1)[..., -2:]
        margin = top2[..., 1] - top2[..., 0]
        decisive = margin > 2 * (tol.atol + tol.rtol * np.abs(top2).max(axis=-1))
        same = a.argmax(axis=-1) == e.argmax(axis=-1)
        agreement = float(same[decisive].mean()) if decisive.any() else 1.0
    ok = close and (agreement is None or agreement == 1.0)
    return max_abs, max_rel, agreement, ok


def check(
    runtime: str, runner: Runner, cases: Sequence[Case], spec: ExportSpec, tol: Tolerance
) -> list[Row]:
    """Run every golden case through ``runner``; one row per case and output."""
    rows = []
    for case in cases:
        try:
            outputs = runner(case.inputs)
        except Exception as exc:
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            rows.append(_failed_row(runtime, case.name, f"{type(exc).__name__}: {first_line}"))
            continue
        if len(outputs) != len(case.expected):
            rows.append(
                _failed_row(
                    runtime, case.name, f"{len(outputs)} outputs, expected {len(case.expected)}"
                )
            )
            continue
        for name, got, want in zip(spec.output_names, outputs, case.expected, strict=True):
            max_abs, max_rel, agreement, ok = compare(np.asarray(got), want, tol, spec.task)
            rows.append(Row(runtime, case.name, name, max_abs, max_rel, agreement, ok))
    return rows


def table(rows: Sequence[Row], tolerances: dict[str, Tolerance] | None = None) -> str:
    """A fixed-width table of parity rows, failures marked ``FAIL``."""
    cols = ("runtime", "case", "output", "max_abs", "max_rel", "argmax")
    head = "{:<14} {:<14} {:<10} {:>10} {:>10} {:>8}  result".format(*cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        agree = "n/a" if r.agreement is None else f"{100 * r.agreement:.1f}%"
        verdict = "ok" if r.ok else "FAIL" + (f" ({r.error})" if r.error else "")
        lines.append(
            f"{r.runtime:<14} {r.case:<14} {r.output:<10} {r.max_abs:>10.3g} "
            f"{r.max_rel:>10.3g} {agree:>8}  {verdict}"
        )
    if tolerances:
        lines.append(
            "tolerance: "
            + ", ".join(f"{k} rtol={t.rtol:g} atol={t.atol:g}" for k, t in tolerances.items())
        )
    return "\n".join(lines)


def summary(rows: Sequence[Row], tol: Tolerance) -> dict[str, Any]:
    """The manifest's per-format parity record."""
    return {
        "ok": all(r.ok for r in rows),
        "rtol": tol.rtol,
        "atol": tol.atol,
        "max_abs": max((r.max_abs for r in rows), default=0.0),
        "max_rel": max((r.max_rel for r in rows), default=0.0),
        "min_argmax_agreement": min(
            (r.agreement for r in rows if r.agreement is not None), default=None
        ),
        "rows": [asdict(r) for r in rows],
    }


def latency(
    runner: Runner, spec: ExportSpec, batch_sizes: Sequence[int], repeats: int
) -> dict[str, dict[str, float]]:
    """p50/p95 wall milliseconds of one call per batch size (validation rows, 3 warm-ups)."""
    out = {}
    for size in batch_sizes:
        inputs = [t.detach().cpu().numpy().copy() for t in spec.example(size)]
        for _ in range(3):
            runner(inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner(inputs)
            times.append(1000 * (time.perf_counter() - start))
        out[f"batch_{size}"] = {
            "p50_ms": float(np.percentile(times, 50)),
            "p95_ms": float(np.percentile(times, 95)),
        }
    return out


def _failed_row(runtime: str, case: str, note: str) -> Row:
    """A row for a case whose outputs could not be compared at all (always a failure)."""
    return Row(runtime, case, "*", float("inf"), float("inf"), None, False, note)
