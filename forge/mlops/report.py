"""``drift.json`` and a self-contained HTML report (plots inlined as base64 PNGs), committed
like every forge artifact: files first, ``manifest.json`` (size + sha256) last."""

from __future__ import annotations

import base64
import html
import io
import json
import time
from typing import Any

from forge.checkpoint import storage
from forge.checkpoint.manifest import FileEntry
from forge.mlops.drift import ColumnDrift, DriftResult

REPORT_FORMAT = "forge.drift_report"


def write_report(
    result: DriftResult,
    out: str,
    options: storage.StorageOptions | None = None,
    context: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``drift.json``, ``report.html`` and then ``manifest.json`` under ``out``.

    Args:
        result: What :func:`forge.mlops.drift.detect_drift` returned.
        out: A folder URI (local or ``s3://``).
        options: Storage options.
        context: Extra facts for both files (model, version, data source).

    Returns:
        File name -> URI of what was written.
    """
    body = {**result.to_dict(), "context": context or {}}
    files = {
        "drift.json": json.dumps(body, indent=1, default=_json_default).encode(),
        "report.html": render_html(result, context or {}).encode(),
    }
    written = {}
    for name, data in files.items():
        written[name] = storage.join(out, name)
        storage.write_bytes(written[name], data, options)
    manifest = {
        "format": REPORT_FORMAT,
        "version": 1,
        "created_at": time.time(),
        "files": {n: FileEntry.of(d).__dict__ for n, d in files.items()},
    }
    written["manifest.json"] = storage.join(out, "manifest.json")
    storage.write_bytes(written["manifest.json"], json.dumps(manifest, indent=1).encode(), options)
    return written


def _json_default(value: Any) -> Any:
    return str(value)  # numpy scalars and the like; everything else is plain JSON already


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _column_plot(col: ColumnDrift) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.2, 2.4))
    x = np.arange(len(col.bins))
    ax.bar(x - 0.2, col.reference, 0.4, label="reference", color="#4c72b0")
    ax.bar(x + 0.2, col.current, 0.4, label="current", color="#dd8452")
    ax.set_xticks(x, col.bins, rotation=45, ha="right", fontsize=6)
    ax.set_ylabel("share")
    ax.set_title(f"{col.column} ({'DRIFT' if col.drifted else 'ok'})", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def _scores_plot(cols: list[ColumnDrift]) -> str:
    """Each column's score against its threshold, on one scale: p-value tests as
    ``threshold / p`` (>= 1 means drift), distances as ``distance / threshold``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = []
    for c in cols:
        if c.p_value is not None:
            ratios.append(c.threshold / max(c.p_value, 1e-300))
        else:
            ratios.append(c.statistic / c.threshold)
    # Clipped to [1e-3, 1e3]: a p-value of 1e-128 is "far past the threshold", not a scale.
    ratios = [min(max(r, 1e-3), 1e3) for r in ratios]
    fig, ax = plt.subplots(figsize=(6.5, 0.3 * len(cols) + 1.0))
    colors = ["#c44e52" if c.drifted else "#55a868" for c in cols]
    ax.barh([c.column for c in cols], ratios, color=colors)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("score / threshold (>= 1: drift; clipped to 1e-3..1e3)")
    ax.tick_params(axis="y", labelsize=7)
    return _png(fig)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def render_html(result: DriftResult, context: dict[str, Any]) -> str:
    """The report as one HTML string (no external files or scripts).

    Example:
        >>> from forge.mlops.drift import DriftResult
        >>> r = DriftResult(drift=False, reasons=[], rows=0, method="bonferroni", alpha=0.05,
        ...     alpha_per_test=0.05, tests=0, drifted_features=[], drift_share=0.0, features=[])
        >>> "No drift" in render_html(r, {})
        True
    """
    cols = [c for c in result.features if c.skipped is None]
    cols += [c for c in (result.label, result.prediction) if c is not None and c.skipped is None]
    verdict = "DRIFT" if result.drift else "No drift"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>forge drift report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}.d{color:#c44e52;"
        "font-weight:bold}img{margin:4px}</style></head><body>",
        f"<h1>{verdict}</h1>",
        f"<p>{result.rows} rows; {result.tests} tests; method {html.escape(result.method)}, "
        f"alpha {result.alpha} ({_fmt(result.alpha_per_test)} per test). Exit code "
        f"{result.exit_code}.</p>",
    ]
    if context:
        items = "".join(
            f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in context.items()
        )
        parts.append(f"<ul>{items}</ul>")
    if result.reasons:
        items = "".join(f"<li>{html.escape(r)}</li>" for r in result.reasons)
        parts.append(f"<ul class='d'>{items}</ul>")
    if result.performance:
        p = result.performance
        parts.append(
            f"<p>Performance: {html.escape(p['metric'])} registered {_fmt(p['reference'])}, "
            f"on this batch {_fmt(p['current'])} (drop {_fmt(p['drop'])}, allowed "
            f"{_fmt(p['max_drop'])}).</p>"
        )
    if cols:
        parts.append(f"<img src='data:image/png;base64,{_scores_plot(cols)}'>")
        parts.append(
            "<table><tr><th>column</th><th>kind</th><th>test</th><th>statistic</th>"
            "<th>p-value</th><th>threshold</th><th>PSI</th><th>nulls ref/cur</th>"
            "<th>n ref/cur</th><th>verdict</th></tr>"
        )
        for c in cols:
            flag = "<span class='d'>drift</span>" if c.drifted else "ok"
            parts.append(
                f"<tr><td>{html.escape(c.column)}</td><td>{c.kind}</td><td>{c.test}</td>"
                f"<td>{_fmt(c.statistic)}</td><td>{_fmt(c.p_value)}</td>"
                f"<td>{_fmt(c.threshold)}</td><td>{_fmt(c.psi)}{' (major)' * c.psi_major}</td>"
                f"<td>{c.reference_null_fraction:.3f} / {c.current_null_fraction:.3f}</td>"
                f"<td>{c.reference_n} / {c.current_n}</td><td>{flag}</td></tr>"
            )
        parts.append("</table><h2>Distributions (reference vs current, frozen bins)</h2>")
        # Drifted columns first: they are what the reader came for.
        for c in sorted(cols, key=lambda c: not c.drifted):
            parts.append(f"<img src='data:image/png;base64,{_column_plot(c)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
