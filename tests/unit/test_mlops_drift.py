"""Drift tests: each test type finds a real shift and stays quiet on data from the reference
distribution; the false-alarm rate at the defaults is measured over 200+ batches."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlops_stubs import make_profile

from forge.mlops.drift import detect_drift, psi
from forge.mlops.reference import load_profile
from forge.mlops.specs import MonitorSpec


def population(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Five features of different shapes and one label, from a fixed distribution."""
    return pd.DataFrame(
        {
            "normal": rng.normal(10.0, 2.0, n),
            "lognormal": rng.lognormal(0.0, 1.0, n),
            "uniform": rng.uniform(-1.0, 1.0, n),
            "city": rng.choice(["paris", "lyon", "nice", "lille"], n, p=[0.4, 0.3, 0.2, 0.1]),
            "plan": rng.choice(["free", "pro"], n, p=[0.7, 0.3]),
            "target": rng.choice([0, 1], n, p=[0.6, 0.4]),
        }
    )


@pytest.fixture(scope="module")
def reference() -> tuple[pd.DataFrame, object]:
    frame = population(np.random.default_rng(0), 5000)
    return frame, load_profile(make_profile(frame, label="target"))


SMALL, LARGE = 400, 4000  # KS/chi2 below monitor.large_sample_rows, W/JS above


def shifted(frame: pd.DataFrame, column: str, rng: np.random.Generator) -> pd.DataFrame:
    out = frame.copy()
    if column == "normal":
        out[column] = out[column] + 0.5 * 2.0  # half a standard deviation
    elif column == "city":
        out[column] = rng.choice(["paris", "lyon", "nice", "lille"], len(out), p=[0.1] * 3 + [0.7])
    elif column == "target":
        out[column] = rng.choice([0, 1], len(out), p=[0.3, 0.7])
    return out


@pytest.mark.parametrize(
    ("column", "rows", "test"),
    [
        ("normal", SMALL, "ks"),
        ("normal", LARGE, "wasserstein"),
        ("city", SMALL, "chi2"),
        ("city", LARGE, "jensenshannon"),
    ],
)
def test_shift_is_found_by_each_test_type(reference, column, rows, test):
    _, profile = reference
    rng = np.random.default_rng(1)
    result = detect_drift(profile, shifted(population(rng, rows), column, rng))
    by_name = {f.column: f for f in result.features}
    assert by_name[column].test == test
    assert by_name[column].drifted
    assert result.drift and result.drifted_features == [column]
    assert result.exit_code == 3
    # The same batch size without the shift: no drift, same test type.
    quiet = detect_drift(profile, population(rng, rows))
    assert not quiet.drift and quiet.exit_code == 0
    assert {f.column: f for f in quiet.features}[column].test == test


@pytest.mark.parametrize("rows", [SMALL, LARGE])
def test_label_drift(reference, rows):
    _, profile = reference
    rng = np.random.default_rng(2)
    result = detect_drift(profile, shifted(population(rng, rows), "target", rng))
    assert result.label is not None and result.label.drifted
    assert result.drifted_features == []
    assert result.drift


def test_prediction_and_performance_drift(reference):
    _, profile = reference
    rng = np.random.default_rng(3)
    batch = population(rng, SMALL)
    ref_pred = {"kind": "categorical", "counts": {"0": 600, "1": 400}}
    good = batch["target"].to_numpy()  # a perfect model
    ok = detect_drift(
        profile,
        batch,
        predictions=good,
        reference_predictions=ref_pred,
        reference_metric=("val/accuracy", 1.0),
    )
    assert not ok.drift and ok.performance["current"] == 1.0
    bad = np.where(rng.random(SMALL) < 0.5, 1, good)  # mostly predicts 1 now, often wrongly
    res = detect_drift(
        profile,
        batch,
        predictions=bad,
        reference_predictions=ref_pred,
        reference_metric=("val/accuracy", 1.0),
    )
    assert res.prediction.drifted
    assert res.performance["drifted"]
    assert res.performance["current"] == pytest.approx(float(np.mean(bad == good)))
    assert res.tests == 7  # 5 features + label + prediction: Bonferroni over all of them
    assert res.alpha_per_test == pytest.approx(0.05 / 7)


@pytest.mark.parametrize("rows", [SMALL, LARGE])
def test_false_alarm_rate_on_resamples_of_the_reference_is_at_most_alpha(reference, rows):
    """200 batches resampled (with replacement) from the reference rows: the share flagged as
    drifted at the defaults must be <= 5%."""
    frame, profile = reference
    rng = np.random.default_rng(5)
    alarms = 0
    for _ in range(200):
        alarms += detect_drift(profile, frame.iloc[rng.integers(0, len(frame), rows)]).drift
    assert alarms / 200 <= 0.05, alarms


def test_false_alarm_rate_on_fresh_batches_of_the_population_is_at_most_alpha():
    """Harder: batches drawn fresh from the population the reference came from, so the
    reference's own sampling noise counts too. 10 references x 25 batches (a two-sample test's
    rate holds on average over references; one unlucky reference alone can sit above alpha)."""
    alarms = trials = 0
    for ref_seed in range(10):
        rng = np.random.default_rng(100 + ref_seed)
        profile = load_profile(make_profile(population(rng, 5000), label="target"))
        for _ in range(25):
            alarms += detect_drift(profile, population(rng, SMALL)).drift
            trials += 1
    assert alarms / trials <= 0.05, alarms


def test_uncorrected_tests_would_alarm_far_more_often(reference):
    """Why Bonferroni: six tests at alpha each alarm about 1-(0.95^6) = 26% of the time."""
    _, profile = reference
    rng = np.random.default_rng(6)
    loose = MonitorSpec(multiple_testing="drift_share", drift_share=0.01)
    alarms = sum(detect_drift(profile, population(rng, SMALL), loose).drift for _ in range(200))
    assert alarms / 200 > 0.10


def test_drift_share_rule(reference):
    _, profile = reference
    rng = np.random.default_rng(7)
    batch = shifted(population(rng, SMALL), "normal", rng)
    spec = MonitorSpec(multiple_testing="drift_share", drift_share=0.5)
    result = detect_drift(profile, batch, spec)
    assert "normal" in result.drifted_features
    assert not result.drift  # 1 of 5 features < 50%
    assert detect_drift(
        profile, batch, MonitorSpec(multiple_testing="drift_share", drift_share=0.2)
    ).drift


def test_psi_values_on_frozen_bins(reference):
    _, profile = reference
    rng = np.random.default_rng(8)
    same = detect_drift(profile, population(rng, LARGE))
    assert all(f.psi < 0.02 for f in same.features)
    moved = detect_drift(profile, shifted(population(rng, LARGE), "normal", rng))
    normal = {f.column: f for f in moved.features}["normal"]
    # A +0.5 sd shift of a normal on deciles: PSI = sum (c - r) ln(c / r) ~ 0.26.
    expected = _normal_decile_psi(0.5)
    assert normal.psi == pytest.approx(expected, abs=0.04)


def _normal_decile_psi(shift_sd: float) -> float:
    from scipy import stats

    cuts = stats.norm.ppf(np.linspace(0, 1, 11))
    cur = np.diff(stats.norm.cdf(cuts - shift_sd))
    return psi(np.full(10, 0.1), cur, 1e-4)


def test_psi_epsilon_for_new_categories(reference):
    _, profile = reference
    batch = population(np.random.default_rng(9), SMALL)
    batch["city"] = "berlin"  # every value is a category the reference never saw
    city = {f.column: f for f in detect_drift(profile, batch).features}["city"]
    assert city.bins[-1] == "<new>" and city.current[-1] == 1.0
    # PSI: the four known bins go to epsilon, the new bin comes from epsilon to 1.
    ref = np.array([0.4, 0.3, 0.2, 0.1])
    eps = 1e-4
    want = float(np.sum((eps - ref) * np.log(eps / ref)) + (1 - eps) * np.log(1 / eps))
    assert city.psi == pytest.approx(want, rel=0.02)
    assert city.drifted and city.psi_major


def test_missing_feature_is_named(reference):
    _, profile = reference
    batch = population(np.random.default_rng(10), 50).drop(columns=["uniform"])
    with pytest.raises(ValueError, match="'uniform'"):
        detect_drift(profile, batch)


def test_unknown_profile_version_is_refused():
    with pytest.raises(ValueError, match="version 2"):
        load_profile({"format": "forge.data_profile", "version": 2, "columns": {}})


def test_result_is_json(reference):
    _, profile = reference
    result = detect_drift(profile, population(np.random.default_rng(11), SMALL))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["format"] == "forge.drift" and len(data["features"]) == 5


def test_report_is_committed_and_self_contained(reference, tmp_path):
    from forge.checkpoint.manifest import FileEntry
    from forge.mlops.report import write_report

    _, profile = reference
    rng = np.random.default_rng(12)
    result = detect_drift(profile, shifted(population(rng, SMALL), "normal", rng))
    written = write_report(result, str(tmp_path / "r"), context={"model": "m:1"})
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert FileEntry.of((tmp_path / "r" / name).read_bytes()).sha256 == entry["sha256"]
    page = (tmp_path / "r" / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "DRIFT" in page
    assert page.count("data:image/png;base64,") == 1 + 6  # scores + 5 features + label
    assert "src='http" not in page and "<script" not in page
    assert json.loads((tmp_path / "r" / "drift.json").read_text())["drift"] is True
    assert set(written) == {"drift.json", "report.html", "manifest.json"}


def _loans(rows: int, seed: int) -> pd.DataFrame:
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "scripts" / "make_tabular_data.py"
    spec = importlib.util.spec_from_file_location("make_tabular_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_frame(rows, seed=seed).drop(columns=["id"])


def test_with_forge_data_profile_and_integer_columns():
    """The real profiler (forge.data.profile) on the loans data, whose age and accounts are
    integer-valued: those are tested on their frozen bins, and 200 resamples stay quiet."""
    from forge.data.profile import ProfileBuilder

    frame = _loans(5000, seed=0)
    builder = ProfileBuilder(label="default")
    builder.update(frame)
    profile = load_profile(builder.finish(source="test", fingerprint="f"))
    rng = np.random.default_rng(13)
    result = detect_drift(profile, frame.iloc[rng.integers(0, len(frame), SMALL)])
    tests = {f.column: (f.test, f.binned) for f in result.features}
    assert tests["accounts"] == ("chi2", True) and tests["age"] == ("chi2", True)
    assert tests["debt_ratio"] == ("ks", False) and tests["region"] == ("chi2", False)
    alarms = 0
    for _ in range(200):
        alarms += detect_drift(profile, frame.iloc[rng.integers(0, len(frame), SMALL)]).drift
    assert alarms / 200 <= 0.05, alarms
    moved = frame.iloc[rng.integers(0, len(frame), SMALL)].copy()
    moved["accounts"] += 1
    assert detect_drift(profile, moved).drifted_features == ["accounts"]
