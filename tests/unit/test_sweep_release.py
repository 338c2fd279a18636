"""What the sweep driver gives back for a stopped trial, and when (no Ray needed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from forge.checkpoint.lock import LOCK_NAME
from forge.sweep.release import LOCK_KEY, RESULT_KEY, Held, ReleaseStopped, release_run


@dataclass
class Trial:
    trial_id: str
    status: str = "RUNNING"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[ReleaseStopped, list[str], Clock]:
    released: list[str] = []
    clock = Clock()
    cb = ReleaseStopped(
        grace_s=5, release=lambda held: released.append(held.placement_group), clock=clock
    )
    return cb, released, clock


def test_a_stopped_trial_s_group_goes_after_the_grace_period() -> None:
    cb, removed, clock = make()
    a, b = Trial("a"), Trial("b")
    cb.on_trial_result(0, [a, b], a, {RESULT_KEY: "pg-a"})
    cb.on_trial_result(0, [a, b], b, {RESULT_KEY: "pg-b"})
    a.status = "TERMINATED"  # ASHA stopped it
    cb.on_step_end(1, [a, b])
    clock.now = 4.9
    cb.on_step_end(2, [a, b])
    assert removed == []  # its actor may still be ending
    clock.now = 5.0
    cb.on_step_end(3, [a, b])
    assert removed == ["pg-a"]  # the running trial keeps its group
    cb.on_step_end(4, [a, b])
    assert removed == ["pg-a"]  # once


def test_a_paused_trial_restarted_within_the_grace_still_loses_its_old_group() -> None:
    cb, removed, clock = make()
    a = Trial("a")
    cb.on_trial_result(0, [a], a, {RESULT_KEY: "pg-1"})
    a.status = "PAUSED"  # PBT exploit
    cb.on_step_end(1, [a])
    a.status = "RUNNING"  # restarted from another trial's checkpoint, not reported yet
    clock.now = 6
    cb.on_step_end(2, [a])
    assert removed == ["pg-1"]


def test_a_restarted_run_reporting_a_new_group_releases_the_old_one_at_once() -> None:
    cb, removed, _ = make()
    a = Trial("a")
    cb.on_trial_result(0, [a], a, {RESULT_KEY: "pg-1"})
    cb.on_trial_result(1, [a], a, {RESULT_KEY: "pg-1"})
    assert removed == []
    cb.on_trial_result(2, [a], a, {RESULT_KEY: "pg-2"})
    assert removed == ["pg-1"]
    cb.on_experiment_end([a])
    assert removed == ["pg-1", "pg-2"]


def test_a_failing_release_never_breaks_the_sweep() -> None:
    def boom(held: Held) -> None:
        raise RuntimeError("GCS is shutting down")

    cb = ReleaseStopped(grace_s=0, release=boom)
    a = Trial("a", "ERROR")
    cb.on_trial_result(0, [a], a, {RESULT_KEY: "pg"})
    cb.on_step_end(1, [a])
    assert cb.held == {}


def test_the_callback_survives_tune_s_experiment_snapshot() -> None:
    import pickle

    cb, _, _ = make()
    a = Trial("a")
    cb.on_trial_result(0, [a], a, {RESULT_KEY: "pg", "run_dir": "/s/t", LOCK_KEY: "tok"})
    again = pickle.loads(pickle.dumps(cb))
    assert again.held == {"a": Held("pg", "/s/t", "tok")} and again.grace_s == 5


def test_the_stopped_run_s_lock_goes_but_a_newer_holder_s_stays(tmp_path: Path, monkeypatch):
    import forge.sweep.release as release

    monkeypatch.setattr(release, "remove_placement_group", lambda pg: True)  # no Ray here
    lock = tmp_path / "trial-a" / LOCK_NAME
    lock.parent.mkdir()
    lock.write_text(json.dumps({"token": "new", "pid": 1}))  # the restarted run took it
    release_run(Held("pg", str(lock.parent), "old"))
    assert lock.exists()
    lock.write_text(json.dumps({"token": "old", "pid": 1}))  # still the stopped run's
    release_run(Held("pg", str(lock.parent), "old"))
    assert not lock.exists()
