"""Retraining policy (persistence, cooldown, new rows) and the promotion gate: a worse
challenger is refused with its numbers in the audit log and the champion unchanged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlops_stubs import make_export, make_profile

from forge.mlops.policy import BatchRecord, promotion_gate, should_retrain
from forge.mlops.promotion import evaluate_and_promote
from forge.mlops.registry import Registry
from forge.mlops.specs import PromotionSpec, RetrainSpec

SPEC = RetrainSpec(windows=3, cooldown_s=100, min_new_rows=50)


def batches(*drift: bool, start: float = 1000, rows: int = 20) -> list[BatchRecord]:
    return [BatchRecord(start + 10 * i, rows, d) for i, d in enumerate(drift)]


def test_drift_must_persist_for_the_configured_windows():
    assert not should_retrain(batches(True, True), None, 2000, SPEC).retrain
    assert should_retrain(batches(True, True, True), None, 2000, SPEC).retrain
    interrupted = should_retrain(batches(True, True, False, True, True), None, 2000, SPEC)
    assert not interrupted.retrain and interrupted.consecutive_drifted == 2
    assert should_retrain(batches(False, True, True, True), None, 2000, SPEC).retrain


def test_cooldown_and_only_batches_after_the_last_retrain_count():
    history = batches(True, True, True, True, True, True)  # t = 1000 .. 1050
    soon = should_retrain(history, last_retrain=1015, now=1060, spec=SPEC)
    assert not soon.retrain
    assert soon.consecutive_drifted == 4 and soon.rows_since_retrain == 80
    assert any("cooldown" in r for r in soon.reasons)
    later = should_retrain(history, last_retrain=1015, now=1115.1, spec=SPEC)
    assert later.retrain, later.reasons
    # Right after a retrain, the batches before it no longer count.
    assert should_retrain(history, last_retrain=1045, now=2000, spec=SPEC).consecutive_drifted == 1


def test_min_new_rows():
    few = should_retrain(batches(True, True, True, rows=10), None, 2000, SPEC)
    assert not few.retrain and few.rows_since_retrain == 30
    assert any("min_new_rows=50" in r for r in few.reasons)


def test_gate_numbers_and_checks():
    spec = PromotionSpec(metric="accuracy", min_delta=0.02)
    ok = promotion_gate(
        {"accuracy": 0.93}, {"accuracy": 0.90}, spec, parity_ok=True, contract_ok=True
    )
    assert ok.promote and ok.delta == pytest.approx(0.03)
    small = promotion_gate(
        {"accuracy": 0.91}, {"accuracy": 0.90}, spec, parity_ok=True, contract_ok=True
    )
    assert not small.promote
    no_parity = promotion_gate(
        {"accuracy": 0.99}, {"accuracy": 0.5}, spec, parity_ok=False, contract_ok=True
    )
    assert not no_parity.promote and "parity" in no_parity.reasons[0]
    loss = PromotionSpec(metric="loss", mode="min", min_delta=0.1)
    assert promotion_gate(
        {"loss": 0.2}, {"loss": 0.5}, loss, parity_ok=True, contract_ok=True
    ).promote
    first = promotion_gate({"accuracy": 0.5}, None, spec, parity_ok=True, contract_ok=True)
    assert first.promote  # no champion yet: the checks alone decide


def _setup(tmp_path):
    """A 2-feature problem where the label is sign(a): a good model and a worse one."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=400), "b": rng.normal(size=400)})
    frame["y"] = (frame["a"] > 0).astype(int)
    reg = Registry(str(tmp_path / "registry"))
    good = np.array([[-1.0, 1.0], [0.0, 0.0]])  # logit1 - logit0 = 2a: right everywhere
    worse = np.array([[-1.0, 1.0], [-0.8, 0.8]])  # also leans on b: wrong on many rows
    for step, w in ((1, good), (2, worse)):
        make_export(
            str(tmp_path / f"run{step}" / "exports" / "s"),
            w,
            np.zeros(2),
            profile=make_profile(frame, label="y"),
        )
        reg.register("m", str(tmp_path / f"run{step}" / "exports" / "s"))
    reg.promote("m", 1)
    return reg, frame


def test_worse_challenger_is_refused_and_champion_stays(tmp_path):
    reg, frame = _setup(tmp_path)
    gate = evaluate_and_promote(reg, "m", 2, frame, PromotionSpec(metric="accuracy"))
    assert not gate.promote
    assert gate.champion == 1.0 and gate.challenger < 0.9
    assert reg.resolve("m@champion").version == 1
    refusal = reg.audit("m")[-1]
    assert refusal["action"] == "promotion-refused" and refusal["version"] == 2
    assert refusal["metrics"]["champion"] == 1.0
    assert refusal["metrics"]["challenger"] == pytest.approx(gate.challenger)
    assert refusal["metrics"]["delta"] == pytest.approx(gate.challenger - 1.0)


def test_better_challenger_is_promoted(tmp_path):
    reg, frame = _setup(tmp_path)
    reg.promote("m", 2)  # the worse one is champion now
    gate = evaluate_and_promote(reg, "m", 1, frame, PromotionSpec(metric="accuracy"))
    assert gate.promote and reg.resolve("m@champion").version == 1
    entry = reg.audit("m")[-1]
    assert entry["action"] == "promote" and entry["previous"] == 2
    assert entry["metrics"]["delta"] == pytest.approx(1.0 - gate.champion)


def test_challenger_refused_when_the_data_breaks_the_contract(tmp_path):
    reg, frame = _setup(tmp_path)
    reg.promote("m", 2)
    gate = evaluate_and_promote(
        reg, "m", 1, frame.drop(columns=["b"]), PromotionSpec(metric="accuracy")
    )
    assert not gate.promote and gate.checks["data_contract"] is False
    assert reg.resolve("m@champion").version == 2
