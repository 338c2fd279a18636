"""The trial driver's reporting to Tune and its choice of run folder, without a Ray cluster."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from forge.sweep.grammar import parse_sweep
from forge.sweep.trial import POINTER_FILE, TrialSetup, _Reporter, decide_run


@pytest.fixture()
def reports(monkeypatch: pytest.MonkeyPatch) -> list[tuple[dict[str, Any], Any]]:
    from ray import tune

    seen: list[tuple[dict[str, Any], Any]] = []

    def report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        pointer = None
        if checkpoint is not None:
            with open(os.path.join(checkpoint.path, POINTER_FILE)) as f:
                pointer = json.load(f)
            assert os.listdir(checkpoint.path) == [POINTER_FILE]  # a pointer, never the bytes
        seen.append((dict(metrics), pointer))

    monkeypatch.setattr(tune, "report", report)
    return seen


def reporter(pointer: dict[str, Any] | None = None, run_name: str = "trial-a") -> _Reporter:
    setup = TrialSetup(parse_sweep(["seed=0,1"]), "/s", "val/loss", "min")
    r = _Reporter(setup, run_name, f"/s/{run_name}", "a", pointer)
    r.checkpoint_every = 10
    r.handle({"event": "start", "total_steps": 25, "step": 0})
    return r


def test_validation_waits_for_its_checkpoint_and_reports_a_pointer(reports):
    r = reporter()
    r.handle({"event": "log", "step": 10, "train/loss": 1.0, "lr": 0.1})
    r.handle({"event": "val", "step": 10, "val/loss": 0.9})
    assert reports == []  # a checkpoint is due at step 10: report it together
    r.handle({"event": "checkpoint", "step": 10, "uri": "/s/trial-a/step_10"})
    metrics, pointer = reports[0]
    assert metrics == {
        "val/loss": 0.9,
        "train/loss": 1.0,
        "lr": 0.1,
        "step": 10,
        "run_dir": "/s/trial-a",
        "forge_final": False,
    }
    assert pointer == {
        "uri": "/s/trial-a/step_10",
        "step": 10,
        "run_name": "trial-a",
        "trial_id": "a",
    }
    r.handle({"event": "val", "step": 15, "val/loss": 0.8})  # no checkpoint due: at once
    assert reports[1][0]["step"] == 15 and reports[1][1] is None
    r.handle({"event": "val", "step": 25, "val/loss": 0.7})  # the last step saves a checkpoint
    r.handle({"event": "checkpoint", "step": 25, "uri": "/s/trial-a/step_25"})
    assert len(reports) == 2  # the last report waits for the run's end (run_trial flushes)
    r.flush(final=True)
    assert reports[2][1]["uri"] == "/s/trial-a/step_25"
    assert reports[2][0]["forge_final"] is True  # Tune's stopper ends the trial here


def test_rank_0_goes_on_only_after_tune_took_the_report(reports):
    """The report point: rank 0 committed step 10's checkpoint and waits for its ack."""
    acks: list[int] = []
    r = reporter()
    r.ack = acks.append
    r.handle({"event": "val", "step": 10, "val/loss": 0.9})
    r.handle({"event": "checkpoint", "step": 10, "uri": "/s/trial-a/step_10"})
    assert len(reports) == 1 and acks == []  # reported, but the ack waits for the report point
    r.handle({"event": "report", "step": 10})
    assert acks == [10]
    # A checkpoint due at a validation step that never came (skipped): the report point
    # still reports the validation, without a pointer, and lets rank 0 go on.
    r.handle({"event": "val", "step": 20, "val/loss": 0.8})
    r.handle({"event": "report", "step": 20})
    assert reports[1][0]["step"] == 20 and reports[1][1] is None
    assert acks == [10, 20]
    # After a restart, steps Tune has seen are not reported again, but are still acked.
    r.handle({"event": "val", "step": 15, "val/loss": 0.8})
    r.handle({"event": "report", "step": 15})
    assert len(reports) == 2 and acks == [10, 20, 15]


def test_restarted_trial_never_reports_a_step_twice(reports):
    r = reporter(pointer={"uri": "/s/trial-a/step_10", "step": 10, "run_name": "trial-a"})
    r.handle({"event": "val", "step": 5, "val/loss": 1.0})
    r.handle({"event": "val", "step": 10, "val/loss": 1.0})
    r.flush()
    assert reports == []
    r.handle({"event": "val", "step": 15, "val/loss": 0.5})
    assert [m["step"] for m, _ in reports] == [15]


def test_decide_run():
    assert decide_run("a", None, lambda n: False) == ("trial-a", "auto", None)
    own = {"uri": "/s/trial-a/step_10", "run_name": "trial-a", "step": 10, "trial_id": "a"}
    assert decide_run("a", own, lambda n: True) == ("trial-a", "auto", None)
    other = {"uri": "/s/trial-b/step_20", "run_name": "trial-b", "step": 20, "trial_id": "b"}
    assert decide_run("a", other, lambda n: False) == (
        "trial-a-from-b-20",
        "/s/trial-b/step_20",
        "/s/trial-b/step_20",
    )
    # the exploited segment restarted before reporting a checkpoint of its own: continue it
    assert decide_run("a", other, lambda n: True) == ("trial-a-from-b-20", "auto", None)
    mine_later = {"uri": "/s/x/step_30", "run_name": "trial-a-from-b-20", "step": 30}
    assert decide_run("a", mine_later, lambda n: True) == ("trial-a-from-b-20", "auto", None)


def test_finished_run_is_reported_not_reopened(tmp_path):
    from forge.checkpoint.store import CheckpointStore
    from forge.sweep.trial import finished_run

    run = str(tmp_path / "trial-t1")
    store = CheckpointStore(run)
    store.save(10, {"model.bin": b"w10"}, strategy="test")
    rows = [{"step": 5, "time": 1.0, "train/loss": 2.0}, {"step": 10, "time": 2.0, "val/loss": 0.7}]
    (tmp_path / "trial-t1" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    assert finished_run(run, 20, None) is None  # step 10 of 20: not finished, train continues
    row, uri, step = finished_run(run, 10, None)
    assert (row["val/loss"], row["step"], row["event"], step) == (0.7, 10, "val", 10)
    assert uri == store.committed()[-1].uri
