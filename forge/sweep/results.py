"""A sweep's results as files a person can use (Ray-free): trials.csv, best.yaml, plots.

Everything lands in the sweep folder ``<storage.uri>/<sweep.name>/`` and commits like a
checkpoint: the files first, then ``results_manifest.json`` with each file's size and sha256.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from forge.checkpoint import storage
from forge.checkpoint.manifest import FileEntry
from forge.checkpoint.storage import StorageOptions
from forge.config.overrides import hydra_value

RESULTS_MANIFEST = "results_manifest.json"


@dataclass
class TrialRecord:
    """One trial as the results see it.

    Attributes:
        trial_id: Tune's trial id.
        params: The swept keys and this trial's values.
        status: Tune's status (TERMINATED, ERROR, ...); ``stopped_early`` tells ASHA's stops.
        history: ``[{"step": int, <metric>: float, ...}]`` in report order.
        run_dir: The forge run folder of the trial's last segment.
        best_checkpoint: forge's best committed checkpoint of that run (by the sweep metric).
        max_steps: The steps the trial was configured to train (to tell early stops).
    """

    trial_id: str
    params: dict[str, Any]
    status: str
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: str | None = None
    best_checkpoint: str | None = None
    max_steps: int | None = None
    error: str | None = None

    def values(self, metric: str) -> list[float]:
        return [float(r[metric]) for r in self.history if _finite(r.get(metric))]

    def final(self, metric: str) -> float | None:
        vals = self.values(metric)
        return vals[-1] if vals else None

    def best(self, metric: str, mode: str) -> float | None:
        vals = self.values(metric)
        if not vals:
            return None
        return min(vals) if mode == "min" else max(vals)

    @property
    def steps(self) -> int:
        return max((int(r.get("step", 0)) for r in self.history), default=0)

    @property
    def stopped_early(self) -> bool:
        return (
            self.status == "TERMINATED"
            and self.max_steps is not None
            and 0 < self.steps < self.max_steps
        )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_trial(trials: Sequence[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    """The trial with the best value of ``metric`` at any validation (ties: the first).

    Example:
        >>> a = TrialRecord("a", {}, "TERMINATED", [{"step": 1, "m": 0.5}])
        >>> b = TrialRecord("b", {}, "TERMINATED", [{"step": 1, "m": 0.2}, {"step": 2, "m": 0.3}])
        >>> best_trial([a, b], "m", "min").trial_id, best_trial([a, b], "m", "max").trial_id
        ('b', 'a')
    """
    scored = [(t.best(metric, mode), i, t) for i, t in enumerate(trials)]
    scored = [s for s in scored if s[0] is not None]
    if not scored:
        return None
    sign = 1 if mode == "min" else -1
    return min(scored, key=lambda s: (sign * s[0], s[1]))[2]


def trials_csv(trials: Sequence[TrialRecord], metric: str, mode: str) -> str:
    """One row per trial: id, every swept param, final and best metric, steps, status, folders.

    Example:
        >>> t = TrialRecord("a", {"optim.lr": 0.1}, "TERMINATED", [{"step": 5, "val/loss": 0.4}])
        >>> print(trials_csv([t], "val/loss", "min").splitlines()[0])
        trial_id,optim.lr,final_val/loss,best_val/loss,steps,status,stopped_early,run_dir,best_checkpoint
    """
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "trial_id",
            *names,
            f"final_{metric}",
            f"best_{metric}",
            "steps",
            "status",
            "stopped_early",
            "run_dir",
            "best_checkpoint",
        ]
    )
    for t in trials:
        writer.writerow(
            [
                t.trial_id,
                *(t.params.get(n, "") for n in names),
                _num(t.final(metric)),
                _num(t.best(metric, mode)),
                t.steps,
                t.status,
                t.stopped_early,
                t.run_dir or "",
                t.best_checkpoint or "",
            ]
        )
    return out.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else repr(value)


def best_yaml(
    best: TrialRecord,
    command: Sequence[str],
    config: dict[str, Any],
    metric: str,
    mode: str,
    recipe_group: str | None = None,
) -> str:
    """The best trial as an experiment file, with the exact command in its header.

    ``config`` is the trial's composed config without run-specific keys (storage, ray,
    run_name, resume, sweep); the file pins all of it, so ``experiment=best`` reproduces the
    trial whatever the shipped defaults are: copy it to ``<dir>/experiment/best.yaml`` and run
    ``python -m forge experiment=best 'hydra.searchpath=[file://<dir>]'`` (or copy it into
    ``configs/experiment/``).

    Example:
        >>> t = TrialRecord("a", {"optim.lr": 0.01}, "TERMINATED", [{"step": 5, "val/loss": 0.4}])
        >>> text = best_yaml(t, ["optim.lr=0.01"], {"optim": {"lr": 0.01}}, "val/loss", "min")
        >>> yaml.safe_load(text)["optim"]["lr"]
        0.01
    """
    line = shlex.join(["python", "-m", "forge", *command])
    header = [
        "# @package _global_",
        f"# Best trial {best.trial_id} of a forge sweep: {metric}={best.best(metric, mode)!r} "
        f"({mode}), {best.steps} steps. Swept values: "
        + ", ".join(f"{k}={hydra_value(v)}" for k, v in best.params.items()),
        "# Re-run it exactly:",
        f"#   {line}",
        "# or as an experiment: copy this file to <dir>/experiment/best.yaml",
        "#   and run: python -m forge experiment=best 'hydra.searchpath=[file://<dir>]'",
    ]
    body: dict[str, Any] = {}
    if recipe_group:
        body["defaults"] = [{"override /recipe": recipe_group}]
    body.update(config)
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False)


def plot_png(trials: Sequence[TrialRecord], metric: str) -> dict[str, bytes]:
    """PNG plots: metric vs step for every trial, and metric vs each swept parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        rows = [r for r in t.history if _finite(r.get(metric))]
        if rows:
            ax.plot(
                [r["step"] for r in rows], [r[metric] for r in rows], marker=".", label=t.trial_id
            )
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by trial")
    if len(trials) <= 12:
        ax.legend(fontsize=7)
    out["metric_vs_step.png"] = _png(fig)
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    for name in names:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs, ys = [], []
        for t in trials:
            y = t.final(metric)
            if y is not None and name in t.params:
                xs.append(t.params[name])
                ys.append(y)
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], ys)
        if numeric and xs and min(xs) > 0 and max(xs) / min(xs) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"final {metric}")
        out[f"metric_vs_{_safe(name)}.png"] = _png(fig)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_results(
    sweep_uri: str,
    trials: Sequence[TrialRecord],
    metric: str,
    mode: str,
    best_command: Sequence[str] = (),
    best_config: dict[str, Any] | None = None,
    recipe_group: str | None = None,
    options: StorageOptions | None = None,
) -> dict[str, str]:
    """Write trials.csv, best.yaml and the plots, then the manifest; returns name -> URI.

    Example:
        >>> import tempfile
        >>> t = TrialRecord("a", {"seed": 1}, "TERMINATED", [{"step": 5, "val/loss": 0.4}])
        >>> files = write_results(tempfile.mkdtemp(), [t], "val/loss", "min", ["seed=1"], {})
        >>> sorted(files)[:3]
        ['best.yaml', 'metric_vs_seed.png', 'metric_vs_step.png']
    """
    files: dict[str, bytes] = {"trials.csv": trials_csv(trials, metric, mode).encode()}
    best = best_trial(trials, metric, mode)
    if best is not None:
        files["best.yaml"] = best_yaml(
            best, best_command, best_config or {}, metric, mode, recipe_group
        ).encode()
    for name, data in plot_png(trials, metric).items():
        files[f"plots/{name}"] = data
    uris = {}
    for name, data in files.items():
        uri = storage.join(sweep_uri, name)
        storage.write_bytes(uri, data, options)
        uris[name.removeprefix("plots/")] = uri
    manifest = {
        "format": "forge-sweep-results/1",
        "created_at": time.time(),
        "metric": metric,
        "mode": mode,
        "files": {n: vars(FileEntry.of(d)) for n, d in files.items()},
    }
    storage.write_bytes(
        storage.join(sweep_uri, RESULTS_MANIFEST), json.dumps(manifest, indent=1).encode(), options
    )
    return uris
