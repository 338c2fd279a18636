"""``forge.train``: config (or overrides) in, trained model and a :class:`RunResult` out.

The driver side of a run, in order: compose → validate → plan the run folder (new, or resumed)
→ write provenance → start/join Ray → check resources → launch → summarize.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape

from forge.checkpoint import storage
from forge.checkpoint.lock import RunLock
from forge.checkpoint.storage import StorageOptions
from forge.checkpoint.store import CheckpointStore, open_checkpoint
from forge.config.compose import compose
from forge.config.overrides import hydra_value, overrides_for, without_keys
from forge.config.resume import (
    check_resume_config,
    describe_changes,
    record_resume,
    run_folder_of,
)
from forge.config.resume import saved_config as saved_config_of
from forge.config.specs import LaunchPlan, RunSpec
from forge.config.validate import to_run_spec
from forge.errors import CheckpointError, ConfigError, ForgeError
from forge.progress import make_console
from forge.run_folder import (
    config_hash,
    env_secrets,
    git_state,
    redacted_config,
    scrub,
    write_provenance,
)
from forge.strategies.preflight import check_available, check_resumable


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced.

    Attributes:
        metrics: Final metrics from rank 0 (validation metrics after the last step).
        global_step: Optimizer steps reached.
        last_checkpoint: URI of the newest committed checkpoint.
        best_checkpoint: URI of the best checkpoint by ``checkpoint.monitor`` (or None).
        run_dir: The run folder (config, metrics.jsonl, tensorboard/, checkpoints/).
        step_time_s: Median wall time per optimizer step on rank 0, after warm-up.
        time_to_first_step_s: From the ``forge.train`` call to the end of the first step.
        wall_time_s: The whole call.
        resume_command: The command that continues this run.
    """

    metrics: dict[str, float]
    global_step: int
    last_checkpoint: str | None
    best_checkpoint: str | None
    run_dir: str
    step_time_s: float | None = None
    time_to_first_step_s: float | None = None
    wall_time_s: float = 0.0
    resume_command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def train(
    config: DictConfig | Sequence[str] | None = None,
    *,
    overrides: Sequence[str] | None = None,
    console: Console | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    report_acks: Any = None,
) -> RunResult:
    """Train a recipe on Ray and return the result.

    Args:
        config: A composed config (from :func:`forge.compose`) or a list of Hydra overrides.
            None trains the default experiment.
        overrides: The overrides that produced ``config`` (recorded in the run folder and the
            resume command); taken from ``config`` when it is a list. For a config without
            them, the ones :func:`forge.compose` remembered, or else every difference from the
            default config, so the printed resume command composes this same config.
        console: Where progress and the summary go (stderr by default).
        on_progress: Also called with every progress event from rank 0 (validations,
            committed checkpoints, ...); a sweep trial reports them to Tune from here.
        report_acks: A ``ray.util.queue.Queue`` that makes every validation a report point
            (forge.sweep passes one): at each validation before the last, the workers commit
            the pending checkpoints and rank 0 waits until the step number arrives on it, so
            the run never trains ahead of what Tune has decided on.

    Returns:
        A :class:`RunResult`.

    Raises:
        ConfigError: Invalid config, caught before any worker starts.
        ClusterError: The cluster cannot run it (no GPUs, too few CPUs, unreachable address).
        TrainingError: A worker failed more often than ``trainer.max_failures`` allows.

    Example:
        >>> result = forge.train(["trainer.max_steps=20"])  # doctest: +SKIP
        >>> result.global_step  # doctest: +SKIP
        20
    """
    launch_time = time.time()
    if config is None or not isinstance(config, DictConfig):
        overrides = list(config or []) if overrides is None else list(overrides)
        config = compose(overrides)
    elif overrides is None:
        overrides = overrides_for(config)
    overrides = list(overrides)
    # Values read from the environment never reach a message or a console line in clear.
    secrets = env_secrets(config)
    console = console or make_console()
    try:
        return _train(config, overrides, console, launch_time, secrets, on_progress, report_acks)
    except ForgeError as exc:
        if not secrets:
            raise
        raise type(exc)(scrub(str(exc), secrets)) from None


def _train(
    config: DictConfig,
    overrides: list[str],
    console: Console,
    launch_time: float,
    secrets: Sequence[str] = (),
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    report_acks: Any = None,
) -> RunResult:
    from forge.cluster import check_resources, check_storage_shared, ray_session
    from forge.launch import launch
    from forge.progress import ConsoleProgress, print_summary

    spec = to_run_spec(config)
    saved_config = redacted_config(config)
    plan, notice = plan_run(spec, saved_config, launch_time)
    if notice:
        console.print(notice, highlight=False, markup=False)
    # The data pass (forge.data): bad data is refused here, before any worker starts.
    from forge.data.prepare import prepare as prepare_data

    data = prepare_data(spec)
    plan = plan.model_copy(update={"data_fingerprint": data.fingerprint, "data_table": data.table})
    for note in data.notes:
        console.print(note, highlight=False, markup=False)
    # One run per run folder, from here until the end (refused here, before any worker starts).
    lock = RunLock.acquire(
        plan.run_uri,
        options=StorageOptions.from_spec(spec.storage),
        stale_after_s=spec.storage.lock_stale_after_s,
        take_over_stale=spec.resume == "auto",
        break_lock=spec.storage.break_lock,
        description=f"recipe {spec.recipe.name}",
    )
    # Workers commit only while this lock is still the run's (see forge.checkpoint.lock.fence).
    plan = plan.model_copy(update={"lock_token": lock.info["token"]})
    with lock, ray_session(spec.ray, spec.verbose):
        check_resources(spec.scaling)
        check_storage_shared(spec.storage)
        git_sha, dirty = git_state()
        if plan.resumed_checkpoint is not None:
            record_resume(
                plan.run_uri,
                plan.resumed_checkpoint,
                plan.resumed_step or 0,
                dict(plan.changes),
                lock.options,
            )
        write_provenance(
            plan.run_uri,
            saved_config,
            redact_overrides(overrides),
            seed=spec.seed,
            world_size=spec.scaling.num_workers,
            git_sha=git_sha,
            git_dirty=dirty,
            options=lock.options,
            data_fingerprint=data.fingerprint,
        )
        if data.profile:
            from forge.data.profile import PROFILE_FILE, dumps

            storage.write_bytes(
                storage.join(plan.run_uri, PROFILE_FILE), dumps(data.profile), lock.options
            )
        console.print(
            f"[bold]forge[/] {spec.recipe.name}: {spec.scaling.num_workers} worker(s), "
            f"{spec.strategy.name} over {spec.scaling.backend}, run folder {escape(plan.run_uri)}"
        )
        progress = ConsoleProgress(console)

        def show(event: dict[str, Any]) -> None:  # workers' warnings may quote a secret
            if secrets:
                event = {
                    k: scrub(v, secrets) if isinstance(v, str) else v for k, v in event.items()
                }
            progress(event)
            if on_progress is not None:
                on_progress(event)

        try:
            summary = launch(spec, plan, show, report_acks)
        finally:
            progress.close()
    result = RunResult(
        metrics={k: v for k, v in summary.items() if "/" in k and isinstance(v, (int, float))},
        global_step=int(summary.get("step", 0)),
        last_checkpoint=summary.get("last_checkpoint"),
        best_checkpoint=summary.get("best_checkpoint"),
        run_dir=plan.run_uri,
        step_time_s=summary.get("step_time_s"),
        time_to_first_step_s=summary.get("time_to_first_step_s"),
        wall_time_s=time.time() - launch_time,
        resume_command=resume_command(overrides, plan.run_uri),
    )
    print_summary(console, result)
    return result


def plan_run(
    spec: RunSpec, saved_config: dict[str, Any], launch_time: float
) -> tuple[LaunchPlan, str | None]:
    """Pick the run folder and the checkpoint to start from; refuse to clobber a run.

    * ``resume=null``: a new run folder (an existing one with checkpoints is refused).
    * ``resume=auto``: the run named by ``run_name``, or else the newest run of this recipe
      under ``storage.uri`` that has a committed checkpoint; a fresh run if there is none.
    * ``resume=<uri>``: start from that committed checkpoint, in a new run folder.

    Returns the plan and an optional notice for the console.

    Raises:
        ConfigError: Storage unreachable or not writable, a missing bucket, missing
            credentials, a run folder that must not be written to, a ``resume=`` that is not a
            committed checkpoint, or one of another recipe or model; all before any worker
            starts.
    """
    root = storage.normalize(spec.storage.uri)
    options = StorageOptions.from_spec(spec.storage)
    storage.probe(root, options)
    notice = None
    resume_from = None
    run_name = spec.run_name
    if spec.resume == "auto":
        if run_name is None:
            run_name = newest_resumable_run(root, spec.recipe.name, options)
        run_store = (
            CheckpointStore(storage.join(root, run_name), options=options) if run_name else None
        )
        if run_store is None or run_store.latest(False) is None:
            notice = (
                f"resume=auto: no committed checkpoint for {spec.recipe.name} under {root}; "
                "starting a new run."
            )
    elif spec.resume is not None:
        try:  # fails now if it is not committed
            resume_from = open_checkpoint(spec.resume, options=options).uri
        except CheckpointError as exc:  # a wrong value of resume=: a configuration error
            raise ConfigError(f"resume: {exc}") from None
    if run_name is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(launch_time))
        run_name = f"{spec.recipe.name}-{stamp}"
    run_uri = storage.join(root, run_name)
    if spec.resume != "auto" and CheckpointStore(run_uri, options=options).committed():
        # A fresh run, or one seeded from resume=<uri>, must not mix with another run's
        # checkpoints (the newer of those would win on restart).
        raise ConfigError(
            f"run folder {run_uri} already has checkpoints. Continue it with resume=auto "
            f"run_name={run_name}, or start a new run with another run_name."
        )
    check_available(spec)
    if spec.resume == "auto":
        resuming = CheckpointStore(run_uri, options=options).latest(False)
    else:
        resuming = open_checkpoint(resume_from, False, options) if resume_from else None
    changes: dict[str, Any] = {}
    if resuming is not None:  # an impossible reshard fails here, not on a worker
        check_resumable(spec, resuming.uri, resuming.manifest)
        before = saved_config_of(run_folder_of(resuming.uri), options)
        if before is not None:  # another recipe or model is refused, naming the keys
            changes = check_resume_config(before, saved_config, resuming.uri)
        if changes:
            changed = f"changed on resume (recorded in resumes.json): {describe_changes(changes)}"
            notice = f"{notice}\n{changed}" if notice else changed
    git_sha, _ = git_state()
    plan = LaunchPlan(
        run_uri=run_uri,
        resume_from=resume_from,
        config_hash=config_hash(saved_config),
        git_sha=git_sha,
        launch_time=launch_time,
        resumed_checkpoint=resuming.uri if resuming is not None else None,
        resumed_step=resuming.step if resuming is not None else None,
        changes={k: list(v) for k, v in changes.items()},
    )
    return plan, notice


def newest_resumable_run(
    root: str, recipe_name: str, options: StorageOptions | None = None
) -> str | None:
    """Name of the most recent ``<recipe_name>-*`` run folder with a committed checkpoint."""
    pattern = re.compile(rf"^{re.escape(recipe_name)}-\d{{8}}-\d{{6}}")
    names = sorted(
        (e["name"] for e in storage.list_dir(root, options) if e["type"] == "directory"),
        reverse=True,
    )
    for name in names:
        store = CheckpointStore(storage.join(root, name), options=options)
        if pattern.match(name) and store.committed():
            return name
    return None


_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key)", re.I)


def redact_overrides(overrides: Sequence[str]) -> list[str]:
    """Overrides with the values of secret-looking keys masked, for saving and printing.

    Example:
        >>> redact_overrides(["storage.secret_key=abc", "seed=1"])
        ['storage.secret_key=<redacted>', 'seed=1']
    """
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        # ${oc.env:...} text is no secret (the environment holds it): kept, so it composes again.
        from_env = value.startswith("${oc.env:") and value.endswith("}")
        secret = sep and _SECRET_KEY.search(key) and not from_env
        out.append(f"{key}=<redacted>" if secret else item)
    return out


def resume_command(overrides: Sequence[str], run_uri: str) -> str:
    """``python -m forge <same overrides> run_name=<this run> resume=auto``, quoted for a POSIX
    shell (and the run name for Hydra's grammar), so that pasting it resumes the run.

    Example:
        >>> print(resume_command(["optim.lr=0.01"], "runs/lr=0.001"))
        python -m forge optim.lr=0.01 'run_name="lr=0.001"' resume=auto
    """
    keep = without_keys(redact_overrides(overrides), {"resume", "run_name"})
    name = run_uri.rstrip("/").rsplit("/", 1)[-1]
    return shlex.join(
        ["python", "-m", "forge", *keep, f"run_name={hydra_value(name)}", "resume=auto"]
    )
