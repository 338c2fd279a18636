"""``forge.sweep``: a Hydra sweep command line in, Ray Tune trials out, results a person can use.

The one module that calls Ray Tune. Order: parse and validate every point (no Ray) -> join or
start Ray -> build the Tuner (or restore it: the same command continues a killed sweep) -> run
trials, each a full forge run (:mod:`forge.sweep.trial`) -> trials.csv, best.yaml, plots.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape

from forge.checkpoint.storage import StorageOptions
from forge.sweep.release import ReleaseStopped, _callback_base
from forge.sweep.results import TrialRecord, best_trial, write_results
from forge.sweep.spec import SweepPlan, plan_sweep
from forge.sweep.trial import FINAL_KEY, TrialSetup, run_trial


@dataclass(frozen=True)
class SweepResult:
    """What a finished sweep produced.

    Attributes:
        trials: One dict per trial (trial_id, params, status, steps, final/best metric,
            stopped_early, run_dir, best_checkpoint).
        metric, mode: What was optimized.
        best_overrides: The overrides that re-run the best trial as a single run.
        best_metric: Its best value of ``metric``.
        best_checkpoint: forge's best committed checkpoint of the best trial.
        sweep_dir: ``<storage.uri>/<sweep.name>``.
        files: name -> URI of trials.csv, best.yaml and the PNG plots.
    """

    trials: list[dict[str, Any]]
    metric: str
    mode: str
    best_overrides: list[str] | None
    best_metric: float | None
    best_checkpoint: str | None
    sweep_dir: str
    files: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0

    @property
    def plots(self) -> list[str]:
        """URIs of the PNG plots."""
        return [u for n, u in self.files.items() if n.endswith(".png")]


def sweep(
    overrides: Sequence[str] = (),
    *,
    config_dir: str | None = None,
    console: Console | None = None,
) -> SweepResult:
    """Run a sweep written in Hydra's multirun grammar on Ray Tune.

    Args:
        overrides: Hydra overrides; sweep expressions (``a,b``, ``choice``, ``range``,
            ``interval``, ``tag(log, ...)``) define the search space, ``sweep=...`` picks the
            scheduler (basic, asha, pbt, optuna), the rest is fixed for every trial.
        config_dir: Another primary config folder.
        console: Where the live trial table goes (stderr by default).

    Returns:
        A :class:`SweepResult`.

    Raises:
        ConfigError: Any point of the space is invalid, before Ray or any trial starts.
        ClusterError: The cluster cannot place even one trial.

    Example:
        >>> result = forge.sweep(["sweep=asha", "optim.lr=tag(log,interval(1e-3,1e-1))",
        ...                       "sweep.num_samples=4"])  # doctest: +SKIP
        >>> result.best_overrides  # doctest: +SKIP
    """
    from forge.cluster import check_resources, ray_session, workers_that_fit
    from forge.progress import make_console

    started = time.time()
    console = console or make_console()
    plan = plan_sweep(overrides, config_dir)
    spec = plan.base
    with ray_session(spec.ray, spec.verbose):
        check_resources(spec.scaling)
        concurrent = plan.sweep.max_concurrent_trials or max(
            1, workers_that_fit(spec.scaling) // spec.scaling.num_workers
        )
        console.print(
            f"[bold]forge sweep[/] {plan.name}: {plan.num_trials} trial(s) "
            f"({plan.sweep.scheduler}), {spec.scaling.num_workers} worker(s) each, "
            f"{concurrent} at a time, {plan.metric} ({plan.mode}); folder {escape(plan.uri)}"
        )
        tuner = build_tuner(plan, concurrent, console)
        grid = tuner.fit()
        records = collect(plan, grid)
    return finish(plan, records, console, time.time() - started)


def build_tuner(plan: SweepPlan, concurrent: int, console: Console) -> Any:
    """A new Tuner for ``plan``, or the restored one when its folder holds a sweep already."""
    from ray import tune

    setup = TrialSetup(
        parsed=plan.parsed,
        sweep_uri=plan.uri,
        metric=plan.metric,
        mode=plan.mode,
        monitor_overrides=monitor_overrides(plan),
        config_dir=plan.config_dir,
    )
    # The trial's own actor only waits on its TorchTrainer, whose workers reserve the CPUs and
    # GPUs; concurrency is bounded by max_concurrent_trials instead.
    # (Tune refuses an empty request; one byte of memory reserves nothing that matters.)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"cpu": 0, "memory": 1}
    )
    storage_path, filesystem = tune_storage(plan)
    # The driver shows forge's own trial table; Tune's experiment box and snapshot hints are
    # noise there (verbose=0 silences only the legacy reporter).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    exp_path = f"{storage_path.rstrip('/')}/{plan.name}"
    if tune.Tuner.can_restore(exp_path, storage_filesystem=filesystem):
        console.print(
            f"continuing the sweep in {plan.uri} (finished trials are not rerun)", markup=False
        )
        return tune.Tuner.restore(
            exp_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    param_space = {
        d.name: d.to_tune(as_grid=plan.sweep.scheduler != "optuna") for d in plan.parsed.dims
    }
    scheduler, search_alg = make_scheduler(plan, concurrent)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=plan.metric,
            mode=plan.mode,
            num_samples=plan.sweep.num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            # a Searcher (Optuna) is limited here; the variant generator limits itself
            max_concurrent_trials=concurrent if plan.sweep.scheduler == "optuna" else None,
            trial_dirname_creator=lambda trial: f"tune-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            verbose=0,
            callbacks=[
                LiveTable(plan, console),
                ReleaseStopped(options=StorageOptions.from_spec(plan.base.storage)),
            ],
            # A finished run's last report ends its trial: PBT would otherwise pause it there
            # (synchronous PBT pauses every trial at a boundary) and wait for it forever.
            stop=run_finished,
            # Pointers are a few bytes; keeping them all avoids Tune's forced state snapshots.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=plan.base.trainer.max_failures),
        ),
    )


def make_scheduler(plan: SweepPlan, concurrent: int) -> tuple[Any, Any]:
    """Tune's scheduler and searcher for ``sweep.scheduler`` (time attribute: forge's step)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = plan.sweep
    max_t = plan.base.trainer.max_steps or 10**9

    def asha() -> ASHAScheduler:  # built only when used (it checks grace_period <= max_t)
        return ASHAScheduler(
            time_attr="step",
            max_t=max_t,
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )

    # Tune applies max_concurrent_trials only to a Searcher; the variant generator takes it.
    variants = BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrent)
    if s.scheduler == "basic":
        return FIFOScheduler(), variants
    if s.scheduler == "asha":
        return asha(), variants
    if s.scheduler == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed))
        return (asha() if s.asha else FIFOScheduler()), searcher
    mutations = {d.name: d.to_tune(as_grid=False) for d in plan.parsed.dims}
    pbt = PopulationBasedTraining(
        time_attr="step",
        perturbation_interval=s.perturbation_interval,
        hyperparam_mutations=mutations,
        quantile_fraction=s.quantile_fraction,
        resample_probability=s.resample_probability,
        synch=s.synch,
    )
    return pbt, variants


def run_finished(trial_id: str, result: dict[str, Any]) -> bool:
    """Tune stopper: the trial's forge run has finished (its last report says so)."""
    return bool(result.get(FINAL_KEY))


def monitor_overrides(plan: SweepPlan) -> tuple[str, ...]:
    """Each trial keeps its best checkpoint by the sweep's metric (unless it monitors one)."""
    if plan.base.checkpoint.monitor is not None:
        return ()
    return (f"checkpoint.monitor={plan.metric}", f"checkpoint.mode={plan.mode}")


def tune_storage(plan: SweepPlan) -> tuple[str, Any]:
    """Tune's storage_path and filesystem for the sweep's root (pyarrow's S3 for s3://)."""
    from forge.checkpoint import storage

    if not storage.is_s3(plan.root):
        return plan.root, None
    import pyarrow.fs

    st = plan.base.storage
    kwargs: dict[str, Any] = {}
    if st.endpoint_url:
        scheme, _, host = st.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    region = st.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    bucket, key = storage.split_s3(plan.root)
    return f"{bucket}/{key}".rstrip("/"), pyarrow.fs.S3FileSystem(**kwargs)


class LiveTable(_callback_base()):  # type: ignore[misc]
    """One console line per trial report: trial, params, step, metric, status (driver only)."""

    def __init__(self, plan: SweepPlan, console: Console) -> None:
        self.plan = plan
        self.console = console
        self.names = [d.name for d in plan.parsed.dims]

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its callbacks; a Console cannot be
        return {k: v for k, v in self.__dict__.items() if k != "console"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from forge.progress import make_console

        self.__dict__.update(state, console=make_console())

    def _line(self, trial: Any, step: Any, value: Any, status: str) -> None:
        params = "  ".join(f"{n}={_short(trial.config.get(n))}" for n in self.names)
        shown = f"{value:.4g}" if isinstance(value, (int, float)) else "-"
        self.console.print(
            f"{trial.trial_id:<14} {params}  step {step if step is not None else '-':>6}  "
            f"{self.plan.metric} {shown:>8}  {status}",
            highlight=False,
            markup=False,
        )

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._line(trial, result.get("step"), result.get(self.plan.metric), "RUNNING")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        self._line(trial, last.get("step"), last.get(self.plan.metric), "DONE")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        self._line(trial, last.get("step"), last.get(self.plan.metric), "ERROR")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def collect(plan: SweepPlan, grid: Any) -> list[TrialRecord]:
    """One :class:`TrialRecord` per trial from Tune's ResultGrid and forge's run folders."""
    from forge.checkpoint import storage
    from forge.checkpoint.storage import StorageOptions
    from forge.checkpoint.store import CheckpointStore

    options = StorageOptions.from_spec(plan.base.storage)
    records = []
    for result in grid:
        config = result.config or {}
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or _trial_id(result)
        df = result.metrics_dataframe
        history: list[dict[str, Any]] = []
        if df is not None and "step" in df:
            keep = [
                c
                for c in df.columns
                if c == "step" or c.startswith("val/") or c in ("lr", "train/loss")
            ]
            history = [
                {k: v for k, v in row.items() if v == v}  # drop NaN
                for row in df[keep].to_dict("records")
            ]
        run_dir = metrics.get("run_dir") or storage.join(plan.uri, f"trial-{trial_id}")
        best = None
        try:
            store = CheckpointStore(run_dir, monitor=plan.metric, mode=plan.mode, options=options)
            found = store.best() or store.latest(verify=False)
            best = found.uri if found is not None else None
        except Exception:  # a trial that never committed: no checkpoint to show
            best = None
        status = "ERROR" if result.error is not None else "TERMINATED"
        records.append(
            TrialRecord(
                trial_id=trial_id,
                params={d.name: config.get(d.name) for d in plan.parsed.dims},
                status=status,
                history=history,
                run_dir=run_dir,
                best_checkpoint=best,
                max_steps=plan.base.trainer.max_steps,
                error=str(result.error).splitlines()[0] if result.error is not None else None,
            )
        )
    return records


def _trial_id(result: Any) -> str:
    path = str(getattr(result, "path", "") or "")
    return path.rstrip("/").rsplit("tune-", 1)[-1]


def finish(
    plan: SweepPlan, records: list[TrialRecord], console: Console, wall: float
) -> SweepResult:
    """Write the results files and build the :class:`SweepResult`."""
    from forge.checkpoint.storage import StorageOptions
    from forge.config.compose import compose
    from forge.config.validate import resolve
    from forge.sweep.grammar import point_overrides

    best = best_trial(records, plan.metric, plan.mode)
    command = None
    config = None
    recipe_group = None
    if best is not None:
        command = [
            o for o in point_overrides(plan.parsed, best.params) if not o.startswith("sweep")
        ]
        data = resolve(compose(command, plan.config_dir))
        for key in ("hydra", "sweep", "ray", "storage", "run_name", "resume", "verbose"):
            data.pop(key, None)
        config = data
        recipe_group = data.get("recipe", {}).get("name")
    files = write_results(
        plan.uri,
        records,
        plan.metric,
        plan.mode,
        command or [],
        config,
        recipe_group,
        StorageOptions.from_spec(plan.base.storage),
    )
    rows = []
    for r in records:
        rows.append(
            {
                "trial_id": r.trial_id,
                "params": r.params,
                "status": r.status,
                "steps": r.steps,
                f"final_{plan.metric}": r.final(plan.metric),
                f"best_{plan.metric}": r.best(plan.metric, plan.mode),
                "stopped_early": r.stopped_early,
                "run_dir": r.run_dir,
                "best_checkpoint": r.best_checkpoint,
                "error": r.error,
            }
        )
    result = SweepResult(
        trials=rows,
        metric=plan.metric,
        mode=plan.mode,
        best_overrides=command,
        best_metric=best.best(plan.metric, plan.mode) if best else None,
        best_checkpoint=best.best_checkpoint if best else None,
        sweep_dir=plan.uri,
        files=files,
        wall_time_s=wall,
    )
    console.print(
        f"[bold green]Sweep finished[/] in {wall:.0f} s: {len(records)} trial(s), "
        f"{sum(r.stopped_early for r in records)} stopped early; best {plan.metric}="
        f"{result.best_metric} ({best.trial_id if best else '-'})"
    )
    for name in ("trials.csv", "best.yaml"):
        if name in files:
            console.print(f"  {name}: {files[name]}", markup=False)
    return result
