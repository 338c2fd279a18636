"""Give back the CPUs/GPUs of a trial that Tune stopped, paused or lost (sweep driver only).

Why this exists: a trial is a forge driver, and its Ray Train V2 controller creates the worker
group's placement group. Ray scopes a placement group made inside a non-detached actor to the
*job* (the sweep's driver), not to that actor. When ASHA stops a trial or PBT pauses one, Tune
ends the trial's actor; its controller and workers die with it, but the placement group stays
reserved until the sweep's driver exits. Ray Train's own ``PlacementGroupCleaner`` removes it
only through the State API, which needs the dashboard, and forge's embedded Ray (like the test
cluster) runs without one: there, every stopped trial kept its CPUs and the next trials waited
for workers forever.

So rank 0 of every forge run reports its placement group id and its run lock's token
(``event: placement_group``), the trial passes them on in each ``tune.report``
(:data:`RESULT_KEY`, :data:`LOCK_KEY`), and :class:`ReleaseStopped` gives both back once the
trial is no longer running. A run that ended normally has already given back its own; the
release is then a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forge.checkpoint.storage import StorageOptions

RESULT_KEY = "forge_placement_group"
LOCK_KEY = "forge_lock_token"
_NOT_RUNNING = {"PAUSED", "TERMINATED", "ERROR"}


@dataclass(frozen=True)
class Held:
    """What one trial's forge run holds until it ends: its workers' placement group, and the
    lock of its run folder (``run_dir``; the lock is released only while it holds ``token``)."""

    placement_group: str
    run_dir: str | None = None
    token: str | None = None


def remove_placement_group(pg_id: str) -> bool:
    """Remove the placement group with hex id ``pg_id`` unless Ray has already removed it.

    Uses the GCS directly (no dashboard needed). Returns True when it removed one.
    """
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table
    from ray.util.placement_group import remove_placement_group as ray_remove

    group = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))
    state = placement_group_table(group).get("state")
    if state in (None, "REMOVED"):
        return False
    ray_remove(group)
    return True


def release_run(held: Held, options: StorageOptions | None = None) -> None:
    """Give back what a stopped trial's run held: its placement group, then its run lock.

    The lock is deleted only if it still carries the stopped run's token: a restarted trial
    that has already taken the folder again keeps its own. Without this, a trial that PBT
    paused, resumed on another node, would find its own folder locked until the lock went
    stale (``storage.lock_stale_after_s``), since a dead holder is recognised only on its host.
    """
    from forge.checkpoint.lock import RunLock

    try:
        remove_placement_group(held.placement_group)
    finally:
        if held.run_dir and held.token:
            RunLock(held.run_dir, {"token": held.token}, options).release()


def _callback_base() -> type:
    """Tune's Callback class, imported only when a sweep builds its callbacks (both here and
    forge.sweep.run's LiveTable derive from it)."""
    from ray.tune import Callback

    return Callback


class ReleaseStopped(_callback_base()):  # type: ignore[misc]
    """Tune callback: give back what a trial's run held, once the trial has stopped running.

    Release waits ``grace_s`` after Tune marks the trial stopped, so that the trial's actor
    (which Tune ends right after) is gone first: removing the group under a live trial would
    look like lost workers to its forge driver, which could restart them in a new group.

    Args:
        grace_s: Seconds between a trial leaving RUNNING and the release.
        options: How to reach the sweep's storage (for the run locks).
        release: Releases one :class:`Held` (tests pass a recorder).
        clock: ``time.monotonic`` (tests pass their own).

    Example:
        >>> released = []
        >>> cb = ReleaseStopped(grace_s=0, release=released.append)
        >>> class T:
        ...     trial_id, status = "t1", "RUNNING"
        >>> cb.on_trial_result(0, [T], T, {RESULT_KEY: "aa", "run_dir": "/s/trial-t1"})
        >>> T.status = "TERMINATED"
        >>> cb.on_step_end(1, [T])
        >>> [h.placement_group for h in released]
        ['aa']
    """

    def __init__(
        self,
        grace_s: float = 5.0,
        options: StorageOptions | None = None,
        release: Callable[[Held], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grace_s = grace_s
        self.options = options
        self.release = release or (lambda held: release_run(held, self.options))
        self.clock = clock
        self.held: dict[str, Held] = {}  # trial id -> what its current run holds
        self.stopped_at: dict[str, float] = {}  # trial id -> when it was first seen stopped

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks with the experiment
        return {"grace_s": self.grace_s, "options": self.options, "held": dict(self.held)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["grace_s"], state["options"])  # type: ignore[misc]
        self.held.update(state["held"])

    def _release(self, trial_id: str) -> None:
        self.stopped_at.pop(trial_id, None)
        held = self.held.pop(trial_id, None)
        if held is None:
            return
        try:
            self.release(held)
        except Exception:  # already gone with its job, or Ray is shutting down: nothing held
            pass

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        pg_id = result.get(RESULT_KEY)
        if not pg_id:
            return
        now = Held(pg_id, result.get("run_dir"), result.get(LOCK_KEY))
        before = self.held.get(trial.trial_id)
        if before is not None and before.placement_group != pg_id:
            self._release(trial.trial_id)  # a restarted trial: its previous run's group
        self.held[trial.trial_id] = now
        self.stopped_at.pop(trial.trial_id, None)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = self.clock()
        for trial in trials:
            if trial.trial_id in self.held and trial.status in _NOT_RUNNING:
                self.stopped_at.setdefault(trial.trial_id, now)
        # A stopped run's group goes even if Tune has restarted the trial meanwhile (PBT): the
        # restarted run needs those CPUs to start, so it cannot be waited for.
        for trial_id, since in list(self.stopped_at.items()):
            if now - since >= self.grace_s:
                self._release(trial_id)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial_id in list(self.held):
            self._release(trial_id)
