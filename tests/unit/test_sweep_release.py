"""Which placement groups the sweep driver gives back, and when (no Ray needed)."""

from __future__ import annotations

from dataclasses import dataclass

from forge.sweep.release import RESULT_KEY, ReleaseStopped


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
    removed: list[str] = []
    clock = Clock()
    return ReleaseStopped(grace_s=5, remove=removed.append, clock=clock), removed, clock


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


def test_a_failing_removal_never_breaks_the_sweep() -> None:
    def boom(pg_id: str) -> None:
        raise RuntimeError("GCS is shutting down")

    cb = ReleaseStopped(grace_s=0, remove=boom)
    a = Trial("a", "ERROR")
    cb.on_trial_result(0, [a], a, {RESULT_KEY: "pg"})
    cb.on_step_end(1, [a])
    assert cb.held == {}


def test_the_callback_survives_tune_s_experiment_snapshot() -> None:
    import pickle

    cb, _, _ = make()
    a = Trial("a")
    cb.on_trial_result(0, [a], a, {RESULT_KEY: "pg"})
    again = pickle.loads(pickle.dumps(cb))
    assert again.held == {"a": "pg"} and again.grace_s == 5
