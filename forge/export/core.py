"""``forge.export``: a committed checkpoint in, checked serving artifacts out.

Order, and why: verify the checkpoint and rebuild the model (:mod:`forge.export.source`);
compute the golden batches with the eager model; write each format into a local staging folder
(a format that fails is recorded, the others go on); load each artifact by its own runtime,
after checking its sha256 against the entry the manifest will carry, and run the parity gate;
measure latency and check the budgets; then upload the good files, the golden batches and the
model card, and ``manifest.json`` last. Failed artifacts are never uploaded, and a failure
raises :class:`ExportError` with the per-output table after the manifest recorded it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from forge.checkpoint import storage
from forge.checkpoint.manifest import FileEntry
from forge.checkpoint.storage import StorageOptions
from forge.checkpoint.store import step_dir_name
from forge.errors import ForgeError
from forge.export import folder, parity
from forge.export.artifact import FormatError, Runner, Written, torch_runner
from forge.export.settings import ExportSettings
from forge.export.source import ExportSource, load_source

log = logging.getLogger(__name__)

MiB = 2**20
OK = "ok"


class ExportError(ForgeError):
    """Some format failed (not expressible, parity, or a budget); ``result`` has the details.

    The export folder is still committed: its manifest records which formats are ``ok`` (only
    their files were uploaded) and why the others are not.
    """

    def __init__(self, message: str, result: ExportResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class ExportResult:
    """What :func:`export` committed.

    Attributes:
        uri: The export folder.
        manifest: Its ``manifest.json`` as written.
        statuses: ``{format: "ok" | "failed" | "parity_failed" | "over_budget"}``.
        table: The parity table of every runtime, as printed.
        failures: ``"<format>: <why>"`` for each format that is not ``ok``.
    """

    uri: str
    manifest: dict[str, Any]
    statuses: dict[str, str]
    table: str
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every requested format is ``ok``."""
        return all(s == OK for s in self.statuses.values())


def export(
    checkpoint_uri: str,
    formats: Sequence[str] | None = None,
    out: str | None = None,
    *,
    settings: ExportSettings | None = None,
    storage_options: StorageOptions | None = None,
) -> ExportResult:
    """Export a committed checkpoint to serving formats, each checked by its own runtime.

    Args:
        checkpoint_uri: A checkpoint folder (``runs/x/checkpoints/step_00000300``) or a run
            folder (its newest committed checkpoint, or the best with ``settings.pick="best"``),
            local or ``s3://``.
        formats: Formats to write (``onnx``, ``torch_export``, ``safetensors``,
            ``torchscript``); None: ``settings.formats``.
        out: The export folder; None: ``settings.out`` or
            ``<run folder>/exports/step_XXXXXXXX``.
        settings: Everything else (tolerances, batch sizes, budgets); defaults as
            ``configs/export/default.yaml``.
        storage_options: How to reach remote storage (endpoint, region, retries).

    Returns:
        The committed export.

    Raises:
        ConfigError: Bad settings, a recipe without an export input spec, a committed export
            at ``out`` (without ``overwrite``).
        CheckpointError: The checkpoint does not verify or does not fit the recipe's model.
        ExportError: A format failed; the export is committed with it marked not ``ok``.

    Example:
        >>> result = forge.export("runs/digits-x/checkpoints/step_00000300")  # doctest: +SKIP
        >>> result.statuses                                                      # doctest: +SKIP
        {'onnx': 'ok', 'torch_export': 'ok', 'safetensors': 'ok'}
    """
    import torch

    settings = settings or ExportSettings()
    updates: dict[str, Any] = {}
    if formats is not None:
        updates["formats"] = list(formats)
    if out is not None:
        updates["out"] = out
    if updates:
        settings = ExportSettings(**{**settings.model_dump(), **updates})
    options = storage_options
    src = load_source(checkpoint_uri, settings.pick, options)
    out_uri = storage.normalize(
        settings.out or storage.join(src.run_uri, "exports", step_dir_name(src.checkpoint.step))
    )
    folder.prepare(out_uri, settings.overwrite, options)

    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="forge-export-") as staging:
        spec, model = src.spec, src.model
        example = tuple(t.detach().cpu() for t in spec.example(settings.batch_size))
        cases = parity.golden_cases(model, spec, settings)
        parity.save_golden(cases, spec, os.path.join(staging, parity.GOLDEN))

        records: dict[str, dict[str, Any]] = {}
        all_rows: list[parity.Row] = []
        for fmt in settings.formats:
            record, rows = _one_format(fmt, src, example, cases, settings, staging)
            records[fmt] = record
            all_rows += rows
        records["eager"] = {
            "status": OK,
            "reference": True,
            "latency": parity.latency(
                torch_runner(model), spec, settings.latency_batch_sizes, settings.latency_repeats
            ),
        }
        _check_budgets(records, settings)
        eager = records.pop("eager")

        manifest = _manifest(src, settings, records, cases, example, eager)
        files = [parity.GOLDEN, "README.md"]
        for rec in records.values():
            if rec["status"] == OK:
                files += rec["files"]
        from forge.export import card

        with open(os.path.join(staging, "README.md"), "w") as f:
            f.write(card.render(manifest, out_uri, _data_note(src), settings.license))
        written = folder.commit(out_uri, staging, files, manifest, options)

    tolerances = {f: settings.tolerance.for_format(f) for f in settings.formats}
    result = ExportResult(
        uri=out_uri,
        manifest=written,
        statuses={f: r["status"] for f, r in records.items()},
        table=parity.table(all_rows, tolerances),
        failures=[f"{f}: {r['error']}" for f, r in records.items() if r["status"] != OK],
    )
    if not result.ok:
        raise ExportError(
            f"Export of {src.checkpoint.uri} to {out_uri}: "
            + "; ".join(result.failures)
            + ". Only the formats marked ok were committed.\n"
            + result.table,
            result,
        )
    return result


# -- one format ---------------------------------------------------------------------------------


def _one_format(
    fmt: str,
    src: ExportSource,
    example: tuple[Any, ...],
    cases: list[parity.Case],
    settings: ExportSettings,
    staging: str,
) -> tuple[dict[str, Any], list[parity.Row]]:
    """Write, verify, load and gate one format; returns its manifest record and parity rows."""
    import importlib

    mod = importlib.import_module(f"forge.export.{fmt}")
    tol = settings.tolerance.for_format(fmt)
    start = time.perf_counter()
    try:
        kwargs = {"recipe": src.recipe} if fmt == "safetensors" else {}
        written: Written = mod.write(src.model, src.spec, example, settings, staging, **kwargs)
    except FormatError as exc:
        log.warning("%s", exc)
        return {"status": "failed", "error": str(exc), "op": exc.op}, []
    seconds = time.perf_counter() - start
    entries = {
        name: FileEntry.of_file(os.path.join(staging, name)).__dict__ for name in written.files
    }
    # Loaders of .pt2 / TorchScript unpickle: load only bytes that match the entries that the
    # manifest will carry (hashed right after writing).
    for name, entry in entries.items():
        folder.check_local(os.path.join(staging, name), entry)
    try:
        runners = _runtimes(fmt, mod, staging, src)
    except Exception as exc:  # an artifact its own runtime cannot load is failed
        error = f"{fmt}: its runtime could not load the artifact: {type(exc).__name__}: {exc}"
        log.warning("%s", error)
        return {"status": "failed", "error": error[:1000]}, []
    rows: list[parity.Row] = []
    for name, runner in runners.items():
        rows += parity.check(name, runner, cases, src.spec, tol)
    summary = parity.summary(rows, tol)
    record: dict[str, Any] = {
        "status": OK if summary["ok"] else "parity_failed",
        "files": written.files,
        "size_mb": sum(e["size"] for e in entries.values()) / MiB,
        "export_seconds": round(seconds, 3),
        "parity": summary,
        **written.info,
    }
    if not summary["ok"]:
        bad = [r for r in rows if not r.ok]
        record["error"] = (
            f"parity gate failed on {len(bad)} of {len(rows)} outputs "
            f"(worst max_abs {max(r.max_abs for r in bad):.3g} at {bad[0].runtime} {bad[0].case}; "
            f"rtol {tol.rtol:g}, atol {tol.atol:g})"
        )
        return record, rows
    main = runners.get("onnx[all]") or next(iter(runners.values()))
    record["latency"] = parity.latency(
        main, src.spec, settings.latency_batch_sizes, settings.latency_repeats
    )
    return record, rows


def _runtimes(fmt: str, mod: Any, staging: str, src: ExportSource) -> dict[str, Runner]:
    import torch

    if fmt == "onnx":
        return mod.runtimes(staging, src.spec, threads=torch.get_num_threads())
    if fmt == "safetensors":
        return mod.runtimes(staging, src.spec, src.build_fresh)
    return mod.runtimes(staging, src.spec)


def _check_budgets(records: dict[str, dict[str, Any]], settings: ExportSettings) -> None:
    """Record each budget's numbers; a good format over a budget becomes ``over_budget``."""
    for rec in records.values():
        if rec["status"] != OK or rec.get("reference"):
            continue
        problems = []
        budgets: dict[str, Any] = {}
        if settings.max_size_mb is not None:
            budgets["size_mb"] = {"limit": settings.max_size_mb, "actual": rec["size_mb"]}
            if rec["size_mb"] > settings.max_size_mb:
                problems.append(
                    f"size {rec['size_mb']:.3f} MiB > export.max_size_mb={settings.max_size_mb:g}"
                )
        if settings.max_latency_ms is not None:
            first = f"batch_{min(settings.latency_batch_sizes)}"
            p95 = rec["latency"][first]["p95_ms"]
            budgets["latency_ms"] = {
                "limit": settings.max_latency_ms,
                "actual_p95": p95,
                "at": first,
            }
            if p95 > settings.max_latency_ms:
                problems.append(
                    f"p95 latency at {first.replace('_', ' ')} {p95:.3f} ms > "
                    f"export.max_latency_ms={settings.max_latency_ms:g}"
                )
        if budgets:
            rec["budgets"] = budgets
        if problems:
            rec["status"] = "over_budget"
            rec["error"] = "over budget: " + "; ".join(problems)


# -- manifest -----------------------------------------------------------------------------------


def _io_entries(
    names: Sequence[str],
    arrays_per_case: list[list[np.ndarray]],
    cases: list[parity.Case],
    spec: Any,
) -> list[dict[str, Any]]:
    """Name, dtype and shape of each input/output; a dim that follows a case's batch size or
    sequence length is named (``batch``, ``seq``), the others are numbers."""
    out = []
    for i, name in enumerate(names):
        shapes = [arrays[i].shape for arrays in arrays_per_case]
        dims: list[Any] = []
        for axis, size in enumerate(shapes[-1]):
            sizes = [s[axis] for s in shapes]
            named = None
            for dim_name in (
                "batch",
                *sorted({n for d in spec.dynamic_dims.values() for n in d.values()}),
            ):
                want = [_case_dim(c, spec, dim_name) for c in cases]
                if len(set(sizes)) > 1 and sizes == want:
                    named = dim_name
                    break
            dims.append(named or int(size))
        out.append({"name": name, "dtype": str(arrays_per_case[-1][i].dtype), "shape": dims})
    return out


def _case_dim(case: parity.Case, spec: Any, dim_name: str) -> int | None:
    for arr, name in zip(case.inputs, spec.input_names, strict=True):
        for axis, n in spec.dynamic_dims.get(name, {}).items():
            if n == dim_name:
                return int(arr.shape[axis])
    return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in (
        "forge-train",
        "torch",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "safetensors",
        "numpy",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _manifest(
    src: ExportSource,
    settings: ExportSettings,
    records: dict[str, dict[str, Any]],
    cases: list[parity.Case],
    example: tuple[Any, ...],
    eager: dict[str, Any],
) -> dict[str, Any]:
    from forge.run_folder import git_state

    git_sha, dirty = git_state()
    spec = src.spec
    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "step": src.checkpoint.step,
        "source_checkpoint": src.checkpoint.uri,
        "source_manifest_sha256": src.manifest_sha256,
        "config_hash": src.checkpoint.manifest.config_hash,
        "config_hash_matches": src.config_hash_matches,
        "git_sha": src.checkpoint.manifest.git_sha,
        "export_git_sha": git_sha,
        "export_git_dirty": dirty,
        "strategy": src.checkpoint.manifest.strategy,
        "world_size": src.checkpoint.manifest.world_size,
        "recipe": src.recipe,
        "task": spec.task,
        "preprocessing": spec.preprocessing,
        "inputs": _io_entries(spec.input_names, [c.inputs for c in cases], cases, spec),
        "outputs": _io_entries(spec.output_names, [c.expected for c in cases], cases, spec),
        "export_batch_size": settings.batch_size,
        "golden": {"file": parity.GOLDEN, "cases": [c.name for c in cases]},
        "formats": records,
        "eager_latency": eager["latency"],
        "latency_threads": _threads(),
        "metrics": src.metrics,
        "versions": _versions(),
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _data_note(src: ExportSource) -> str:
    from forge.recipe import import_recipe_module

    doc = (import_recipe_module(src.recipe["module"]).__doc__ or "").strip()
    return doc.split("\n\n")[0].replace("\n", " ") if doc else f"recipe {src.recipe['module']}"
