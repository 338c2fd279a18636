"""Specs -> Ray Train: the one module that builds a TorchTrainer and runs it.

Restarts are forge's, not Ray's: Ray Train runs each attempt with ``max_failures=0`` and forge
decides whether to run another (:func:`run_with_restarts`). Only a failure that a restart can fix
is retried: a worker process or node that died (killed, out of memory, preempted, a failed
health check). A configuration error, an exception from recipe code, a checkpoint that could
not be saved (``storage.on_outage=fail`` after the retry budget), a lost run lock, a hang that
timed out: those would fail the same way again, so the run ends at once with that first, real
message (and a hang's timeouts are waited out once, not once per restart).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from forge.config.specs import LaunchPlan, RunSpec
from forge.errors import ConfigError, ForgeError, TrainingError

ProgressFn = Callable[[dict[str, Any]], None]
EventsFn = Callable[[list[dict[str, Any]]], None]
T = TypeVar("T")
# How often the driver looks for rank 0's events (forge.progress_channel): rank 0 sends at most
# every 0.25 s (forge.progress_sender), and a console a quarter second behind looks live.
_POLL_S = 0.25

# Failures that mean "a process or node went away", by class name (Ray's exception classes
# move between modules across versions; the names are stable). Everything else is
# deterministic as far as forge can tell, and is not retried.
_RESTARTABLE = {
    "RayActorError",
    "ActorDiedError",
    "ActorUnavailableError",
    "NodeDiedError",
    "WorkerCrashedError",
    "LocalRayletDiedError",
    "OutOfMemoryError",
    "ObjectLostError",
    "OwnerDiedError",
    "PreemptionError",
    "WorkerHealthCheckFailedError",
}


def launch(
    spec: RunSpec, plan: LaunchPlan, on_progress: ProgressFn, report_acks: Any = None
) -> dict[str, Any]:
    """Run ``spec`` on the connected Ray cluster; returns rank 0's final summary.

    ``report_acks`` (a ``ray.util.queue.Queue``, from forge.sweep) holds rank 0 at each
    validation until that step is acknowledged there (see :func:`forge.api.train`).

    A lost worker or node restarts the worker group (it resumes from the run's newest
    committed checkpoint), up to ``trainer.max_failures`` times; other failures end the run.

    Raises:
        ForgeError: re-raised as is when a worker raised one (e.g. a ConfigError).
        TrainingError: any other worker failure, with the root cause in one paragraph, or the
            restarts ran out.
    """

    def restarting(count: int, failure: ForgeError) -> None:
        limit = "unlimited" if spec.trainer.max_failures < 0 else spec.trainer.max_failures
        on_progress(
            {
                "event": "warning",
                "message": f"a worker was lost ({failure}); restart {count} of {limit}, from "
                "the newest committed checkpoint",
            }
        )

    return run_with_restarts(
        lambda: _fit_once(spec, plan, on_progress, report_acks),
        spec.trainer.max_failures,
        restarting,
    )


def run_with_restarts(
    attempt: Callable[[], T],
    max_failures: int,
    on_restart: Callable[[int, ForgeError], None] = lambda n, e: None,
) -> T:
    """Call ``attempt`` until it succeeds; retry only failures a restart can fix.

    Args:
        attempt: One run of the worker group; raises what ``trainer.fit()`` raised.
        max_failures: Restarts allowed (``trainer.max_failures``); -1 is unlimited.
        on_restart: Told the restart number and the failure before each restart.

    Raises:
        ForgeError: The first failure that is not restartable, as the worker raised it (or a
            TrainingError summarizing it); or a TrainingError once restarts ran out.

    Example:
        >>> run_with_restarts(lambda: 1 / 0, max_failures=2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        forge.errors.TrainingError: Training failed on a worker: ZeroDivisionError: ...
    """
    restarts = 0
    while True:
        try:
            return attempt()
        except Exception as exc:  # Ray wraps worker errors; show the cause, not the wrapping
            failure = unwrap_failure(exc)
            if not is_restartable(exc):
                raise failure from None
            if 0 <= max_failures <= restarts:
                raise TrainingError(
                    f"Training gave up after {restarts} restart(s) (trainer.max_failures="
                    f"{max_failures}); the last failure: {failure} Committed checkpoints are "
                    "intact: fix the cause (e.g. memory per worker, a flaky node) and resume "
                    "with resume=auto, or allow more restarts with trainer.max_failures."
                ) from None
            restarts += 1
            on_restart(restarts, failure)


def is_restartable(exc: BaseException) -> bool:
    """Whether a restart can fix ``exc``: some worker process or node went away.

    A worker that died takes its peers' collectives down with it (they fail with connection
    errors); one death among the failures makes the whole failure restartable.

    Example:
        >>> is_restartable(RuntimeError("recipe bug"))
        False
    """
    return any(type(e).__name__ in _RESTARTABLE for f in _failures(exc) for e in _cause_chain(f))


def _fit_once(
    spec: RunSpec, plan: LaunchPlan, on_progress: ProgressFn, report_acks: Any = None
) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from forge.progress_channel import ProgressChannel
    from forge.worker import train_fn

    channel = ProgressChannel()
    channel.beat()  # before any worker asks whether the driver is alive
    summary: dict[str, Any] = {}

    def handle(events: list[dict[str, Any]]) -> None:
        for event in events:
            if event.get("event") == "summary":
                summary.update(event)
            else:
                on_progress(event)

    stop = threading.Event()
    pump = threading.Thread(target=_pump, args=(channel, handle, stop), daemon=True)
    pump.start()
    # A thread of its own: a slow on_progress callback must not read as a dead driver.
    threading.Thread(target=_heartbeat, args=(channel, stop), daemon=True).start()

    spec, recipe_env, staging = _ship_recipe_file(spec)
    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    datasets = data_config = None
    if plan.data_table is not None:  # a file source: Ray Data reads it, Ray Train shards it
        from forge.data.feed import check_spare_cpus, make_datasets

        check_spare_cpus(
            ray.cluster_resources().get("CPU", 0), scaling.num_workers, scaling.cpus_per_worker
        )
        datasets = make_datasets(plan.data_table, spec.seed)
        # Only "train" is split across workers; every worker evaluates all of "val".
        data_config = ray.train.DataConfig(datasets_to_split=["train"])
    trainer = TorchTrainer(
        train_fn,
        datasets=datasets,
        dataset_config=data_config,
        train_loop_config={
            "spec": spec,
            "plan": plan,
            "progress": channel,
            "report_acks": report_acks,
        },
        torch_config=TorchConfig(backend=scaling.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            # forge owns checkpoints and the run folder; Ray only keeps its own bookkeeping,
            # under a unique name so it never "restores" a previous attempt behind forge's back.
            name=f"forge-{uuid.uuid4().hex[:12]}",
            storage_path=os.path.join(tempfile.gettempdir(), "forge-ray-train"),
            # forge restarts (run_with_restarts): only what a restart can fix
            failure_config=ray.train.FailureConfig(max_failures=0),
            worker_runtime_env=recipe_env,
        ),
    )
    try:
        result = trainer.fit()
    finally:
        stop.set()
        pump.join(timeout=5)
        _drain(channel, handle)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    if result.error is not None:
        raise result.error
    summary.pop("event", None)
    return summary


def _ship_recipe_file(spec: RunSpec) -> tuple[RunSpec, dict[str, Any], str | None]:
    """Make a ``recipe.module`` file that exists here importable by every worker.

    On one machine every worker reads the file where it is (the path is made absolute, so
    that every worker derives the same module name from it). A cluster of several machines
    is refused: Ray accepts local folders in ``py_modules`` only in a job's runtime env
    (``forge submit`` ships the file with the job), not in a worker group's. Returns the spec,
    the workers' runtime env and a staging folder to delete after the run (None here).

    Raises:
        ConfigError: A recipe file on this machine and workers on other machines.
    """
    from pathlib import Path

    import ray

    module = spec.recipe.module
    if not module.endswith(".py") or not Path(module).expanduser().is_file():
        return spec, {}, None  # a module path, or already shipped by a submitted job's env
    path = Path(module).expanduser().resolve()
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if len(hosts) > 1:
        raise ConfigError(
            f"recipe.module={module} is a file on this machine, and the cluster spans "
            f"{len(hosts)} machines whose workers cannot read it. Submit the run with "
            "`python -m forge submit ...` (the job ships the file with its working dir), or "
            "make the recipe part of a package installed on every node (recipe.module=pkg.mod)."
        )
    recipe = spec.recipe.model_copy(update={"module": str(path)})
    return spec.model_copy(update={"recipe": recipe}), {}, None


def _pump(channel: Any, handle: EventsFn, stop: threading.Event) -> None:
    """Hand rank 0's events to ``handle`` as they arrive, until ``stop``."""
    while not stop.wait(_POLL_S):
        try:
            handle(channel.receive())
        except Exception:  # a store hiccup, or the cluster going away (fit() reports that)
            continue


def _heartbeat(channel: Any, stop: threading.Event) -> None:
    """Bump the driver's heartbeat until ``stop``; a failed beat is retried at the next one
    (workers take the driver for dead only after two minutes without one)."""
    from forge.progress_channel import HEARTBEAT_S

    while not stop.wait(HEARTBEAT_S):
        try:
            channel.beat()
        except Exception:
            continue


def _drain(channel: Any, handle: EventsFn) -> None:
    """The events still unread once the workers are done (the summary among them)."""
    try:
        handle(channel.receive())
        channel.close()
    except Exception:  # the cluster is gone, and its store with it
        pass


def unwrap_failure(exc: BaseException) -> ForgeError:
    """The worker's own exception: forge errors as they were raised, others summarized.

    Of several workers' failures, a forge error wins (it names the problem); else the first.
    """
    roots = [_root_cause(f) for f in _failures(exc)]
    root = next((r for r in roots if isinstance(r, ForgeError)), roots[0])
    if isinstance(root, ForgeError):
        return root
    where = ""
    tb = root.__traceback__
    while tb is not None:  # the innermost frame is where it actually went wrong
        where = f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return TrainingError(
        f"Training failed on a worker: {type(root).__name__}: {root}{where}. "
        "Run again with verbose=true to see the workers' full logs."
    )


def _failures(exc: BaseException) -> list[BaseException]:
    """Each worker's failure (Ray Train V2 WorkerGroupError, by rank), or ``[exc]``."""
    for e in _cause_chain(exc):
        failures = getattr(e, "worker_failures", None)
        if failures:
            return [failures[rank] for rank in sorted(failures)]
    return [exc]


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps, outermost first."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        nxt = None
        for attr in ("health_check_failure", "controller_failure", "_base_exc", "cause"):
            value = getattr(cur, attr, None)  # Ray Train V2 / ray.exceptions wrappers
            if isinstance(value, BaseException):
                nxt = value
                break
        cur = nxt if nxt is not None else cur.__cause__
    return chain


def _root_cause(exc: BaseException) -> BaseException:
    return _cause_chain(exc)[-1]
