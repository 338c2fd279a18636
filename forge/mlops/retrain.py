"""Self-healing retraining: persistent drift -> a normal forge run on the training window ->
export through the parity gate -> register as ``challenger`` -> evaluate challenger and champion
on held-out recent data -> promote or refuse (:mod:`forge.mlops.promotion`).

Each step goes through the same public functions a user would call (``forge.train``,
``forge.export``, :class:`~forge.mlops.registry.Registry`); every decision lands in the audit
log (``retrain-decision``, ``retrain``, ``promote`` or ``promotion-refused``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from forge.errors import ConfigError
from forge.mlops.policy import BatchRecord, GateResult, should_retrain
from forge.mlops.registry import ModelVersion, Registry
from forge.mlops.specs import PromotionSpec, RetrainSpec


@dataclass(frozen=True)
class RetrainOutcome:
    """What a retrain produced: the run, the export, the challenger version, the gate."""

    run_dir: str
    export_uri: str
    challenger: int
    gate: GateResult


def maybe_retrain(reg: Registry, champion: ModelVersion, settings: Any, console: Any) -> Any:
    """Apply :func:`~forge.mlops.policy.should_retrain` to the model's monitoring history and
    retrain when it says so (the ``on_drift=retrain`` of ``python -m forge monitor``)."""
    spec: RetrainSpec = settings.specs["retrain"]
    history = [BatchRecord(b["time"], b["rows"], b["drift"]) for b in reg.batches(champion.name)]
    last = reg.last_event(champion.name, "retrain")
    decision = should_retrain(history, last["unix_time"] if last else None, time.time(), spec)
    reg.log(
        champion.name,
        "retrain-decision",
        version=champion.version,
        retrain=decision.retrain,
        reasons=decision.reasons,
        consecutive_drifted=decision.consecutive_drifted,
        rows_since_retrain=decision.rows_since_retrain,
    )
    if not decision.retrain:
        console.print("no retrain: " + "; ".join(decision.reasons), highlight=False, markup=False)
        return None
    outcome = retrain_and_promote(
        reg,
        champion.name,
        spec,
        settings.specs["promotion"],
        storage_options=settings.options,
        ray_address=settings.top.get("ray.address"),
        console=console,
    )
    verdict = "promoted" if outcome.gate.promote else "refused"
    console.print(
        f"challenger v{outcome.challenger} {verdict}: {outcome.gate.facts()}",
        highlight=False,
        markup=False,
    )
    return outcome


def retrain_and_promote(
    reg: Registry,
    name: str,
    spec: RetrainSpec,
    promotion: PromotionSpec,
    *,
    storage_options: Any = None,
    ray_address: str | None = None,
    console: Any = None,
    extra_overrides: tuple[str, ...] = (),
) -> RetrainOutcome:
    """Train on ``retrain.window_source``, export (ONNX, parity-gated), register as
    ``challenger``, and gate it against the champion on ``retrain.holdout_source``.

    Raises:
        ConfigError: ``retrain.window_source``/``holdout_source`` unset, or the export's ONNX
            format failed its parity gate (the challenger is then not registered).
    """
    import forge
    from forge.export.core import export
    from forge.export.settings import ExportSettings
    from forge.mlops.cli import read_frame
    from forge.mlops.promotion import evaluate_and_promote

    if not spec.window_source or not spec.holdout_source:
        raise ConfigError(
            "on_drift=retrain needs retrain.window_source (reference + recent data to train "
            "on) and retrain.holdout_source (recent rows neither model trained on)."
        )
    overrides = [*spec.train, *extra_overrides, f"data.source={spec.window_source}"]
    if ray_address:
        overrides.append(f"ray.address={ray_address}")
    result = forge.train(overrides, console=console)
    exported = export(
        result.run_dir,
        settings=ExportSettings(formats=["onnx"]),
        storage_options=storage_options,
    )
    if exported.statuses.get("onnx") != "ok":
        reg.log(
            name,
            "retrain",
            run=result.run_dir,
            export=exported.uri,
            registered=False,
            reason=f"ONNX export status {exported.statuses.get('onnx')!r}",
        )
        raise ConfigError(
            f"the retrained model's ONNX export did not pass its parity gate "
            f"({exported.statuses}); the champion stays. See {exported.uri}/README.md."
        )
    mv = register_run_export(
        reg,
        name,
        exported.uri,
        result.run_dir,
        spec.window_source,
        storage_options,
        metrics=result.metrics,
        reason="retrained on drift",
        extra={"training_window": spec.window_source, "training_overrides": list(spec.train)},
    )
    reg.promote(name, mv.version, "challenger", reason="retrained on drift")
    holdout = read_frame(
        spec.holdout_source, None, storage_options or _default_options(), mv.profile().features
    )
    gate = evaluate_and_promote(reg, name, mv.version, holdout, promotion)
    reg.log(
        name,
        "retrain",
        run=result.run_dir,
        export=exported.uri,
        version=mv.version,
        promoted=gate.promote,
    )
    return RetrainOutcome(result.run_dir, exported.uri, mv.version, gate)


def register_run_export(
    reg: Registry,
    name: str,
    export_uri: str,
    run_dir: str,
    window_source: str,
    storage_options: Any = None,
    **kwargs: Any,
) -> ModelVersion:
    """Register a run's export with the distribution of its predictions on its own training
    window (``prediction_profile`` in ``version.json``: the reference of prediction drift).

    Args:
        window_source: The data the run trained on (scored once here, on this machine).
        kwargs: Passed to :meth:`Registry.register` (``metrics``, ``reason``, ``extra``).
    """
    from forge.checkpoint import storage
    from forge.mlops.cli import read_frame
    from forge.mlops.reference import load_profile
    from forge.mlops.score import prediction_profile
    from forge.mlops.scoring import OnnxScorer

    options = storage_options or _default_options()
    profile = load_profile(storage.read_bytes(storage.join(run_dir, "data_profile.json"), options))
    model = storage.read_bytes(storage.join(export_uri, "model.onnx"), options)
    window = read_frame(window_source, None, options, profile.features)
    predictions = OnnxScorer(model, profile.features).predict(window)["prediction"]
    extra = {**kwargs.pop("extra", {}), "prediction_profile": prediction_profile(predictions)}
    return reg.register(name, export_uri, source_run=run_dir, extra=extra, **kwargs)


def _default_options() -> Any:
    from forge.checkpoint.storage import StorageOptions

    return StorageOptions()
