"""When to retrain, and whether a challenger may replace the champion. Pure functions: the
state comes in as arguments, the decision and its reasons go out.

* :func:`should_retrain`: drift must persist for ``retrain.windows`` consecutive batches (one
  drifted batch is often noise or a one-off), the last retrain must be at least
  ``retrain.cooldown_s`` ago (a retrain needs time to prove itself), and at least
  ``retrain.min_new_rows`` rows must have arrived since (otherwise the new model learns nothing
  new). Only batches after the last retrain count.
* :func:`promotion_gate`: the challenger must beat the champion on ``promotion.metric`` by at
  least ``promotion.min_delta`` (in the metric's units, in the direction of
  ``promotion.mode``), measured on the same held-out recent data, and must have passed the
  export parity gate and the data contract. Otherwise the champion stays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from forge.mlops.specs import PromotionSpec, RetrainSpec


@dataclass(frozen=True)
class BatchRecord:
    """One monitored batch: when (unix seconds), how many rows, and the drift verdict."""

    time: float
    rows: int
    drift: bool


@dataclass(frozen=True)
class RetrainDecision:
    """Whether to retrain now, and the numbers behind it."""

    retrain: bool
    reasons: list[str]
    consecutive_drifted: int
    rows_since_retrain: int
    seconds_since_retrain: float | None


def should_retrain(
    history: Sequence[BatchRecord],
    last_retrain: float | None,
    now: float,
    spec: RetrainSpec,
) -> RetrainDecision:
    """Decide whether monitored drift turns into a retraining run.

    Args:
        history: Monitored batches, oldest first.
        last_retrain: Unix time of the last retrain (or of the champion's registration);
            None when there was none.
        now: The current unix time.
        spec: ``retrain.*`` settings.

    Example:
        >>> spec = RetrainSpec(windows=2, cooldown_s=0, min_new_rows=10)
        >>> h = [BatchRecord(1, 10, True), BatchRecord(2, 10, True)]
        >>> should_retrain(h, None, 3, spec).retrain
        True
        >>> should_retrain(h[:1], None, 3, spec).reasons
        ['drift persisted 1 of retrain.windows=2 consecutive batches']
    """
    since = [b for b in history if last_retrain is None or b.time > last_retrain]
    consecutive = 0
    for batch in reversed(since):
        if not batch.drift:
            break
        consecutive += 1
    rows = sum(b.rows for b in since)
    elapsed = None if last_retrain is None else now - last_retrain
    reasons = []
    if consecutive < spec.windows:
        reasons.append(
            f"drift persisted {consecutive} of retrain.windows={spec.windows} consecutive batches"
        )
    if elapsed is not None and elapsed < spec.cooldown_s:
        reasons.append(
            f"last retrain {elapsed:.0f} s ago, within retrain.cooldown_s={spec.cooldown_s:g}"
        )
    if rows < spec.min_new_rows:
        reasons.append(
            f"{rows} new rows since the last retrain, fewer than "
            f"retrain.min_new_rows={spec.min_new_rows}"
        )
    return RetrainDecision(not reasons, reasons, consecutive, rows, elapsed)


@dataclass(frozen=True)
class GateResult:
    """The promotion gate's verdict, with the numbers that go to the audit log."""

    promote: bool
    reasons: list[str]
    metric: str
    challenger: float | None
    champion: float | None
    delta: float | None
    min_delta: float
    checks: dict[str, bool] = field(default_factory=dict)

    def facts(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "challenger": self.challenger,
            "champion": self.champion,
            "delta": self.delta,
            "min_delta": self.min_delta,
            "checks": self.checks,
            "reasons": self.reasons,
        }


def promotion_gate(
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    spec: PromotionSpec,
    *,
    parity_ok: bool,
    contract_ok: bool,
) -> GateResult:
    """May the challenger replace the champion?

    Args:
        challenger / champion: Metrics of both, measured on the same held-out data; champion
            None when there is none yet (then only the checks apply).
        spec: ``promotion.*`` settings.
        parity_ok: The challenger's export passed its parity gate.
        contract_ok: The evaluation data passed the model's data contract.

    Example:
        >>> spec = PromotionSpec(metric="acc", min_delta=0.01)
        >>> g = promotion_gate({"acc": 0.90}, {"acc": 0.95}, spec, parity_ok=True,
        ...                    contract_ok=True)
        >>> g.promote, g.reasons
        (False, ['acc: challenger 0.9 vs champion 0.95 (delta -0.05 < promotion.min_delta=0.01)'])
    """
    reasons = []
    checks = {"export_parity": parity_ok, "data_contract": contract_ok}
    if not parity_ok:
        reasons.append("the challenger's export did not pass its parity gate")
    if not contract_ok:
        reasons.append("the evaluation data did not pass the model's data contract")
    value = challenger.get(spec.metric)
    base = None if champion is None else champion.get(spec.metric)
    delta = None
    if value is None:
        reasons.append(f"the challenger has no {spec.metric} (promotion.metric)")
    elif champion is not None:
        if base is None:
            reasons.append(f"the champion has no {spec.metric} to compare with")
        else:
            delta = (value - base) if spec.mode == "max" else (base - value)
            if delta < spec.min_delta or delta <= 0:
                reasons.append(
                    f"{spec.metric}: challenger {value:.4g} vs champion {base:.4g} "
                    f"(delta {delta:.4g} < promotion.min_delta={spec.min_delta:g})"
                )
    return GateResult(not reasons, reasons, spec.metric, value, base, delta, spec.min_delta, checks)
