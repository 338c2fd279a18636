"""The registry and monitor verbs end to end through ``python -m forge`` (no Ray): exit codes
0 / 2 / 3, files where the docs say, errors as one paragraph."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlops_stubs import make_export, make_profile

from forge.cli import main


def run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0)


def frame(rng: np.random.Generator, n: int, shift: float = 0.0) -> pd.DataFrame:
    out = pd.DataFrame({"a": rng.normal(shift, 1.0, n), "b": rng.normal(0.0, 1.0, n)})
    out["y"] = (out["a"] > 0).astype(int)
    return out


@pytest.fixture()
def registered(tmp_path):
    rng = np.random.default_rng(0)
    ref = frame(rng, 2000)
    export = make_export(
        str(tmp_path / "run" / "exports" / "step_1"),
        np.array([[-1.0, 1.0], [0.0, 0.0]]),
        np.zeros(2),
        metrics={"val/accuracy": 1.0},
        profile=make_profile(ref, label="y"),
    )
    over = [f"registry.uri={tmp_path / 'reg'}"]
    assert run(["registry", "register", export, "--name", "tab", *over]) == 0
    assert run(["registry", "promote", "tab:1", "--alias", "champion", *over]) == 0
    return tmp_path, over


def test_registry_verbs(registered, capsys):
    tmp_path, over = registered
    capsys.readouterr()
    assert run(["registry", "list", *over]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "tab": {"versions": [1], "aliases": {"champion": 1}}
    }
    assert run(["registry", "show", "registry://tab@champion", *over]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ref"] == "registry://tab:1" and shown["aliases"] == {"champion": 1}
    assert run(["registry", "rollback", "tab@champion", *over]) == 2  # nothing before v1
    assert "no previous version" in capsys.readouterr().err
    assert run(["registry", "show", "tab:9", *over]) == 2
    assert run(["registry", "promote", "tab", *over]) == 2
    assert run(["registry", "list", "registry.urx=1"]) == 2
    assert "Did you mean 'registry.uri'" in capsys.readouterr().err


def test_monitor_exit_codes_and_report(registered, capsys):
    tmp_path, over = registered
    rng = np.random.default_rng(1)
    frame(rng, 500).to_parquet(tmp_path / "same.parquet")
    frame(rng, 500, shift=1.0).to_parquet(tmp_path / "moved.parquet")
    base = ["monitor", "model=registry://tab@champion", *over]
    out = tmp_path / "report"
    assert run([*base, f"data.source={tmp_path / 'same.parquet'}", f"monitor.out={out}"]) == 0
    assert json.loads((out / "drift.json").read_text())["drift"] is False
    assert run([*base, f"data.source={tmp_path / 'moved.parquet'}"]) == 3
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "DRIFT" in printed and "a: ks" in printed
    drifted = json.loads(
        next((tmp_path / "reg" / "tab" / "monitor" / "reports").glob("*/drift.json")).read_text()
    )
    assert drifted["drifted_features"] == ["a"]
    assert drifted["performance"]["metric"] == "val/accuracy"  # labels present: scored
    history = sorted((tmp_path / "reg" / "tab" / "monitor" / "history").glob("*.json"))
    assert [json.loads(p.read_text())["drift"] for p in history] == [False, True]


def test_monitor_refuses_a_batch_without_the_model_inputs(registered, capsys):
    tmp_path, over = registered
    frame(np.random.default_rng(2), 50).drop(columns=["b"]).to_parquet(tmp_path / "x.parquet")
    code = run(["monitor", "model=tab@champion", f"data.source={tmp_path / 'x.parquet'}", *over])
    assert code == 2
    assert "no column 'b'" in capsys.readouterr().err


def test_on_drift_retrain_waits_for_persistent_drift(registered, capsys):
    """One drifted batch with retrain.windows=2: no retrain, and the decision is audited."""
    tmp_path, over = registered
    frame(np.random.default_rng(3), 500, shift=1.0).to_parquet(tmp_path / "moved.parquet")
    args = [
        "monitor",
        "model=registry://tab@champion",
        f"data.source={tmp_path / 'moved.parquet'}",
        "on_drift=retrain",
        "retrain.windows=2",
        "retrain.min_new_rows=0",
        *over,
    ]
    assert run(args) == 3
    captured = capsys.readouterr()
    assert "no retrain: drift persisted 1 of retrain.windows=2" in captured.out + captured.err
    from forge.mlops.registry import Registry

    decision = Registry(str(tmp_path / "reg")).last_event("tab", "retrain-decision")
    assert decision["retrain"] is False and decision["consecutive_drifted"] == 1
