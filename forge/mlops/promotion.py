"""The promotion step of the loop: evaluate challenger and champion on the same held-out
recent data, apply :func:`forge.mlops.policy.promotion_gate`, then promote (a conditional
alias move) or record the refusal with its numbers in the audit log. The champion stays unless
the gate says otherwise."""

from __future__ import annotations

from typing import Any

from forge.errors import ConfigError
from forge.mlops.policy import GateResult, promotion_gate
from forge.mlops.registry import Registry
from forge.mlops.scoring import OnnxScorer, accuracy
from forge.mlops.specs import PromotionSpec


def evaluate(registry: Registry, name: str, version: int, frame: Any) -> dict[str, float]:
    """``{"accuracy": ...}`` of ``name:version`` on ``frame`` (which carries the label)."""
    mv = registry.get(name, version)
    label = mv.profile().label
    if label is None or label not in frame.columns:
        raise ConfigError(
            f"{mv}: evaluation needs the label column {label!r} in the held-out data."
        )
    return {"accuracy": accuracy(OnnxScorer.from_version(mv), frame, label)}


def evaluate_and_promote(
    registry: Registry,
    name: str,
    challenger: int,
    holdout: Any,
    spec: PromotionSpec,
    *,
    alias: str = "champion",
    reason: str = "",
) -> GateResult:
    """Gate ``name:challenger`` against the current ``alias`` holder on ``holdout``.

    ``promotion.metric`` names a metric computed here (``accuracy``), measured for both models
    on the same rows, so neither's training-time validation numbers are compared.

    Returns:
        The gate's result; when it says promote, the alias has moved.

    Raises:
        AliasConflictError: The alias moved while evaluating (nothing was promoted).
    """
    current = registry.alias(name, alias)
    generation = current["generation"] if current else 0
    champion = current["version"] if current else None
    mv = registry.get(name, challenger)
    parity_ok = mv.export_manifest.get("formats", {}).get("onnx", {}).get("status") == "ok"
    try:
        OnnxScorer.from_version(mv).check_columns(holdout.columns)
        contract_ok = True
    except ConfigError:
        contract_ok = False
    metric = spec.metric
    challenger_metrics = evaluate(registry, name, challenger, holdout) if contract_ok else {}
    champion_metrics = None
    if champion is not None:
        champion_metrics = evaluate(registry, name, champion, holdout) if contract_ok else {}
    gate = promotion_gate(
        challenger_metrics,
        champion_metrics,
        spec,
        parity_ok=parity_ok,
        contract_ok=contract_ok,
    )
    facts = {**gate.facts(), "champion_version": champion, "holdout_rows": len(holdout)}
    if gate.promote:
        registry.promote(
            name,
            challenger,
            alias,
            reason=reason or f"beat v{champion} on {metric}",
            metrics=facts,
            expected_generation=generation,
        )
    else:
        registry.log(
            name,
            "promotion-refused",
            alias=alias,
            version=challenger,
            reason=reason or "; ".join(gate.reasons),
            metrics=facts,
        )
    return gate
