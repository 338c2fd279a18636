"""The ``registry``, ``monitor`` and ``score`` verbs of ``python -m forge``.

Arguments are ``key=value`` overrides (``registry.*``, ``monitor.*``, ``retrain.*``,
``promotion.*``, ``score.*``, ``storage.*``, ``data.source``/``data.format``, ``model``,
``on_drift``, ``ray.address``) validated into the typed specs of :mod:`forge.mlops.specs`;
``registry`` also takes a subcommand and flags. The verbs decide nothing themselves: they call
:mod:`forge.mlops` functions.

Exit codes: 0 done (``monitor``: no drift), 2 bad input, 3 ``monitor`` found drift, 1 other
errors.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge.checkpoint import storage
from forge.checkpoint.storage import StorageOptions
from forge.errors import ConfigError, did_you_mean
from forge.mlops.specs import MonitorSpec, PromotionSpec, RegistrySpec, RetrainSpec, ScoreSpec

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SECTIONS = {
    "registry": RegistrySpec,
    "monitor": MonitorSpec,
    "retrain": RetrainSpec,
    "promotion": PromotionSpec,
    "score": ScoreSpec,
}
TOP_LEVEL = {"model", "on_drift", "data.source", "data.format", "ray.address"}


@dataclass
class Settings:
    """The validated arguments of one verb."""

    specs: dict[str, Any]
    storage_uri: str
    options: StorageOptions
    top: dict[str, Any]

    @property
    def registry_uri(self) -> str:
        return self.specs["registry"].uri or storage.join(self.storage_uri, "registry")

    def registry(self) -> Any:
        from forge.mlops.registry import Registry

        return Registry(self.registry_uri, self.options, self.specs["registry"].mlflow_uri)


def parse_overrides(args: Sequence[str], usage: str) -> Settings:
    """Validate ``key=value`` arguments.

    Raises:
        ConfigError: Unknown key (with a suggestion), unparsable value, or a value out of range.

    Example:
        >>> s = parse_overrides(["monitor.alpha=0.01", "storage.uri=/tmp/r"], "usage")
        >>> s.specs["monitor"].alpha, s.registry_uri
        (0.01, '/tmp/r/registry')
    """
    import yaml
    from omegaconf import OmegaConf
    from pydantic import ValidationError

    from forge.config.specs import StorageSpec

    storage_cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "storage" / "local.yaml"))
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    top: dict[str, Any] = {}
    storage_over: dict[str, Any] = {}
    for arg in args:
        key, eq, text = arg.partition("=")
        if not eq or not key:
            raise ConfigError(f"{arg!r}: expected key=value. Usage: {usage}")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        section, _, field = key.partition(".")
        if key in TOP_LEVEL:
            top[key] = text if key in ("model", "data.source") else value
        elif section in SECTIONS and field in SECTIONS[section].model_fields:
            raw[section][field] = value
        elif section == "storage":
            parts = field.split(".")
            node = storage_over
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = text if parts[-1] in ("uri", "endpoint_url") else value
        else:
            known = [*TOP_LEVEL, *(f"{s}.{f}" for s, c in SECTIONS.items() for f in c.model_fields)]
            raise ConfigError(
                f"Unknown key {key!r}.{did_you_mean(key, known + ['storage.uri'])} Usage: {usage}"
            )
    merged = OmegaConf.to_container(OmegaConf.merge(storage_cfg, storage_over))
    try:
        specs = {name: cls(**raw[name]) for name, cls in SECTIONS.items()}
        storage_spec = StorageSpec(**merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        section = next((n for n, c in SECTIONS.items() if c.__name__ == exc.title), "storage")
        raise ConfigError(
            f"{section}.{loc}: {err['msg']} (got {err.get('input')!r}). Fix the override."
        ) from None
    return Settings(specs, storage_spec.uri, StorageOptions.from_spec(storage_spec), top)


# -- registry --------------------------------------------------------------------------------

REGISTRY_USAGE = (
    "python -m forge registry list [NAME] | show NAME[@ALIAS|:VERSION] | "
    "register EXPORT_URI --name NAME [--profile URI] | promote NAME:VERSION [--alias champion] "
    "| rollback NAME@ALIAS | audit NAME  [--reason TEXT] [--json] [registry.uri=URI] "
    "[storage.uri=URI] [storage.endpoint_url=URL]"
)


def registry_main(args: Sequence[str]) -> int:
    """``python -m forge registry ...``; returns the exit code."""
    from forge.mlops.registry import ModelRef, RegistryError

    parser = argparse.ArgumentParser(prog="python -m forge registry", usage=REGISTRY_USAGE)
    parser.add_argument(
        "command", choices=["list", "show", "register", "promote", "rollback", "audit"]
    )
    parser.add_argument("target", nargs="?")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--name")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--profile")
    parser.add_argument("--reason", default="")
    parser.add_argument("--json", action="store_true")
    try:
        ns, extra = parser.parse_known_args(list(args))
    except SystemExit as exc:
        if exc.code == 0:
            return 0
        raise ConfigError(f"registry: bad arguments. Usage: {REGISTRY_USAGE}") from None
    positional = [a for a in [ns.target, *ns.overrides, *extra] if a is not None]
    target = next((a for a in positional if "=" not in a), None)
    settings = parse_overrides([a for a in positional if "=" in a], REGISTRY_USAGE)
    reg = settings.registry()
    out: Any
    try:
        if ns.command == "list":
            names = [target] if target else reg.models()
            out = {n: {"versions": reg.versions(n), "aliases": reg.aliases(n)} for n in names}
        elif target is None:
            raise ConfigError(f"registry {ns.command} needs a target. Usage: {REGISTRY_USAGE}")
        elif ns.command == "show":
            mv = reg.resolve(target)
            out = {
                "ref": str(mv),
                "uri": mv.uri,
                **mv.meta,
                "aliases": {a: v for a, v in reg.aliases(mv.name).items() if v == mv.version},
            }
        elif ns.command == "register":
            if not ns.name:
                raise ConfigError(f"registry register needs --name NAME. Usage: {REGISTRY_USAGE}")
            profile = storage.read_bytes(ns.profile, settings.options) if ns.profile else None
            mv = reg.register(ns.name, target, profile=profile, reason=ns.reason)
            out = {"registered": str(mv), "uri": mv.uri, "metrics": mv.metrics}
        elif ns.command == "promote":
            ref = ModelRef.parse(target)
            if ref.version is None:
                raise ConfigError(f"registry promote takes NAME:VERSION, got {target!r}.")
            out = reg.promote(ref.name, ref.version, ns.alias, reason=ns.reason)
        elif ns.command == "rollback":
            ref = ModelRef.parse(target)
            out = reg.rollback(ref.name, ref.alias or ns.alias, reason=ns.reason)
        else:
            out = reg.audit(ModelRef.parse(target).name)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps(out, indent=1, default=str))
    return 0


# -- reading a batch ---------------------------------------------------------------------------


def read_frame(uri: str, fmt: str | None, options: StorageOptions, require: Sequence[str]) -> Any:
    """The whole ``data.source`` as one pandas DataFrame, through forge.data's reader
    (every file checked for the ``require`` columns)."""
    import pandas as pd

    from forge.data.source import read_batches, resolve

    source = resolve(uri, fmt, options)
    frames = list(read_batches(source, require=require))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=require)


# -- monitor ------------------------------------------------------------------------------------

MONITOR_USAGE = (
    "python -m forge monitor model=registry://NAME@ALIAS data.source=URI [monitor.out=URI] "
    "[monitor.alpha=0.05] [monitor.multiple_testing=bonferroni|drift_share] "
    "[on_drift=retrain train=<overrides file>] [registry.uri=URI] [storage.uri=URI]"
)


def monitor_main(args: Sequence[str]) -> int:
    """``python -m forge monitor ...``: exit 0 no drift, 3 drift (see module docstring)."""
    from forge.mlops.drift import detect_drift
    from forge.mlops.registry import RegistryError
    from forge.mlops.report import write_report
    from forge.progress import make_console

    if any(a in ("-h", "--help") for a in args):
        print(f"Usage: {MONITOR_USAGE}")
        return 0
    settings = parse_overrides(args, MONITOR_USAGE)
    model, source = settings.top.get("model"), settings.top.get("data.source")
    if not model or not source:
        raise ConfigError(f"monitor needs model=... and data.source=... Usage: {MONITOR_USAGE}")
    on_drift = settings.top.get("on_drift") or "none"
    if on_drift not in ("none", "retrain"):
        raise ConfigError(f"on_drift={on_drift!r}: use none or retrain.")
    spec: MonitorSpec = settings.specs["monitor"]
    reg = settings.registry()
    try:
        mv = reg.resolve(model)
        profile = mv.profile()
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    frame = read_frame(source, settings.top.get("data.format"), settings.options, profile.features)
    predictions, ref_pred, ref_metric = _predictions(mv, frame, profile, spec)
    result = detect_drift(
        profile,
        frame,
        spec,
        predictions=predictions,
        reference_predictions=ref_pred,
        reference_metric=ref_metric,
    )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = spec.out or storage.join(reg.uri, mv.name, "monitor", "reports", stamp)
    written = write_report(
        result, out, settings.options, context={"model": str(mv), "data.source": source}
    )
    reg.record_batch(
        mv.name,
        {
            "time": time.time(),
            "rows": result.rows,
            "drift": result.drift,
            "version": mv.version,
            "report": out,
            "source": source,
        },
    )
    console = make_console()
    _print_summary(console, result, written)
    if on_drift == "retrain":
        from forge.mlops.retrain import maybe_retrain

        maybe_retrain(reg, mv, settings, console)
    return result.exit_code


def _predictions(mv: Any, frame: Any, profile: Any, spec: MonitorSpec) -> tuple[Any, Any, Any]:
    """Predictions on the batch when the model can be scored, and the references to compare
    them with (the registered prediction distribution; the registered metric)."""
    from forge.mlops.scoring import OnnxScorer

    ref_pred = mv.meta.get("prediction_profile")
    metric = mv.metrics.get(spec.metric)
    has_label = profile.label is not None and profile.label in frame.columns
    if ref_pred is None and not (has_label and metric is not None):
        return None, None, None
    try:
        scorer = OnnxScorer.from_version(mv)
    except ConfigError:
        return None, None, None
    predictions = scorer.predict(frame)["prediction"]
    ref_metric = (spec.metric, float(metric)) if has_label and metric is not None else None
    return predictions, ref_pred, ref_metric


def _print_summary(console: Any, result: Any, written: dict[str, str]) -> None:
    verdict = "[bold red]DRIFT[/]" if result.drift else "[bold green]no drift[/]"
    console.print(
        f"{verdict}: {result.rows} rows, {len(result.drifted_features)} of "
        f"{len(result.features)} features drifted ({result.method})."
    )
    for reason in result.reasons:
        console.print(f"  - {reason}", highlight=False, markup=False)
    for f in result.features:
        if f.drifted:
            score = f"p={f.p_value:.2e}" if f.p_value is not None else f"{f.statistic:.3f}"
            console.print(
                f"  {f.column}: {f.test} {score}, PSI {f.psi:.3f}", highlight=False, markup=False
            )
    console.print(f"report: {written['report.html']}", highlight=False, markup=False)


# -- score ---------------------------------------------------------------------------------------

SCORE_USAGE = (
    "python -m forge score model=registry://NAME@ALIAS data.source=URI score.out=URI "
    "[score.keys=[id]] [score.batch_size=4096] [ray.address=auto] [storage.endpoint_url=URL]"
)


def score_main(args: Sequence[str]) -> int:
    """``python -m forge score ...``: batch scoring with Ray Data over the ONNX artifact."""
    from forge.mlops.registry import RegistryError
    from forge.mlops.score import score
    from forge.progress import make_console

    if any(a in ("-h", "--help") for a in args):
        print(f"Usage: {SCORE_USAGE}")
        return 0
    settings = parse_overrides(args, SCORE_USAGE)
    model, source = settings.top.get("model"), settings.top.get("data.source")
    spec: ScoreSpec = settings.specs["score"]
    if not model or not source or not spec.out:
        raise ConfigError(
            f"score needs model=..., data.source=... and score.out=... Usage: {SCORE_USAGE}"
        )
    try:
        mv = settings.registry().resolve(model)
    except RegistryError as exc:
        raise ConfigError(str(exc)) from None
    result = score(
        mv,
        source,
        spec,
        settings.options,
        fmt=settings.top.get("data.format"),
        ray_address=settings.top.get("ray.address"),
    )
    make_console().print(
        f"scored {result['rows']} rows with {mv} -> {result['out']}",
        highlight=False,
        markup=False,
    )
    return 0
