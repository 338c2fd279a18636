"""Give back the CPUs/GPUs of a trial that Tune stopped, paused or lost (sweep driver only).

Why this exists: a trial is a forge driver, and its Ray Train V2 controller creates the worker
group's placement group. Ray scopes a placement group made inside a non-detached actor to the
*job* (the sweep's driver), not to that actor. When ASHA stops a trial or PBT pauses one, Tune
ends the trial's actor; its controller and workers die with it, but the placement group stays
reserved until the sweep's driver exits. Ray Train's own ``PlacementGroupCleaner`` removes it
only through the State API, which needs the dashboard, and forge's embedded Ray (like the test
cluster) runs without one: there, every stopped trial kept its CPUs and the next trials waited
for workers forever.

So rank 0 of every forge run reports its placement group id (``event: placement_group``), the
trial passes it on in each ``tune.report`` (:data:`RESULT_KEY`), and :class:`ReleaseStopped`
removes it as soon as the trial is no longer running. A run that ended normally has already
removed its own; removing is then a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

RESULT_KEY = "forge_placement_group"
_NOT_RUNNING = {"PAUSED", "TERMINATED", "ERROR"}


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


def _callback_base() -> type:
    from ray.tune import Callback

    return Callback


class ReleaseStopped(_callback_base()):  # type: ignore[misc]
    """Tune callback: remove a trial's placement group once the trial has stopped running.

    Removal waits ``grace_s`` after Tune marks the trial stopped, so that the trial's actor
    (which Tune ends right after) is gone first: removing the group under a live trial would
    look like lost workers to its forge driver, which could restart them in a new group.

    Args:
        grace_s: Seconds between a trial leaving RUNNING and its group's removal.
        remove: Removes one placement group by hex id (tests pass a recorder).
        clock: ``time.monotonic`` (tests pass their own).

    Example:
        >>> removed = []
        >>> cb = ReleaseStopped(grace_s=0, remove=removed.append)
        >>> class T:
        ...     trial_id, status = "t1", "RUNNING"
        >>> cb.on_trial_result(0, [T], T, {RESULT_KEY: "aa"})
        >>> T.status = "TERMINATED"
        >>> cb.on_step_end(1, [T])
        >>> removed
        ['aa']
    """

    def __init__(
        self,
        grace_s: float = 5.0,
        remove: Callable[[str], Any] = remove_placement_group,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grace_s = grace_s
        self.remove = remove
        self.clock = clock
        self.held: dict[str, str] = {}  # trial id -> the placement group of its current run
        self.stopped_at: dict[str, float] = {}  # trial id -> when it was first seen stopped

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks with the experiment
        return {"grace_s": self.grace_s, "held": dict(self.held)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["grace_s"])  # type: ignore[misc]
        self.held.update(state["held"])

    def _release(self, trial_id: str) -> None:
        self.stopped_at.pop(trial_id, None)
        pg_id = self.held.pop(trial_id, None)
        if pg_id is None:
            return
        try:
            self.remove(pg_id)
        except Exception:  # already gone with its job, or Ray is shutting down: nothing held
            pass

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        pg_id = result.get(RESULT_KEY)
        if not pg_id:
            return
        if self.held.get(trial.trial_id) not in (None, pg_id):
            self._release(trial.trial_id)  # a restarted trial: its previous run's group
        self.held[trial.trial_id] = pg_id
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
