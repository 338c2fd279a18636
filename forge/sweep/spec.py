"""The ``sweep`` config group as a frozen spec, and everything checked before a trial starts.

Nothing here imports Ray: a bad sweep is refused in seconds, as one paragraph, before Tune or
any worker starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forge.config.overrides import hydra_value
from forge.config.specs import RunSpec
from forge.errors import ConfigError
from forge.sweep.grammar import Dimension, ParsedSweep, parse_sweep


class SweepSpec(BaseModel):
    """``configs/sweep/<name>.yaml``: how trials are drawn, scheduled and compared."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheduler: Literal["basic", "asha", "pbt", "optuna"] = "basic"
    num_samples: int = Field(1, description="draws per grid point")
    metric: str | None = Field(None, description="null: checkpoint.monitor, else val/loss")
    mode: Literal["min", "max"] | None = None
    max_concurrent_trials: int | None = Field(None, gt=0)
    seed: int | None = None
    name: str | None = None
    # asha / optuna+asha
    grace_period: int = Field(100, gt=0, description="steps before a trial may be stopped")
    reduction_factor: float = Field(2, gt=1)
    asha: bool = False
    # pbt
    perturbation_interval: int = Field(100, gt=0, description="steps between perturbations")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    # Synchronous PBT: exploit only when every trial has reached the boundary. Asynchronous PBT
    # on a small population whose trials start seconds apart (each starts a worker group)
    # often never exploits: a trial records its checkpoint for cloning only when it is in the
    # top quantile at its own boundary, and the others have not reported yet.
    synch: bool = True


# Keys PBT may change between two segments of one run: the checkpoint of one trial must load
# under the other's config. The model's shape, the data order, the world size, the strategy and
# where things are stored cannot change mid-run.
PBT_MUTABLE = (
    "optim.lr",
    "optim.weight_decay",
    "optim.momentum",
    "optim.betas",
    "optim.eps",
    "optim.min_lr_ratio",
    "trainer.gradient_clip_val",
)


class SweepPlan(BaseModel):
    """A validated sweep: what the Tuner needs, decided before any trial starts."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    parsed: ParsedSweep
    sweep: SweepSpec
    base: RunSpec  # the run at the first value of every dimension
    metric: str
    mode: Literal["min", "max"]
    reported: tuple[str, ...]
    name: str
    root: str  # storage.uri, normalized
    uri: str  # <storage.uri>/<name>
    overrides: tuple[str, ...]  # as typed (for best.yaml's command and the name hash)
    config_dir: str | None = None

    @property
    def num_trials(self) -> int:
        """Trials the sweep will run (grid points x num_samples)."""
        return self.parsed.grid_size * self.sweep.num_samples


def plan_sweep(overrides: Sequence[str], config_dir: str | None = None) -> SweepPlan:
    """Parse and validate a sweep; raises ConfigError (one paragraph per problem) if it is bad.

    Composes and validates the config at every choice / grid value and at both ends of every
    interval (each dimension varied alone, the others at their first value), then checks what
    only a sweep needs: ``num_samples >= 1``, the metric among what the recipe reports, PBT only
    over keys that can change within a run, no fractional GPUs with more than one worker.

    Example:
        >>> p = plan_sweep(
        ...     ["sweep=asha", "sweep.grace_period=10", "trainer.max_steps=20", "seed=0,1"]
        ... )
        >>> p.metric, p.mode, p.num_trials, p.sweep.scheduler
        ('val/loss', 'min', 2, 'asha')
    """
    from forge.checkpoint import storage
    from forge.config.compose import compose
    from forge.config.validate import to_run_spec

    parsed = parse_sweep(overrides)
    first = {d.name: d.probe_values()[0] for d in parsed.dims}
    try:
        cfg = compose(_point(parsed, first), config_dir)
        base = to_run_spec(cfg)
    except ConfigError as exc:
        at = ", ".join(f"{d.key}={hydra_value(first[d.name])}" for d in parsed.dims)
        raise ConfigError(f"At the sweep's first point ({at}): {exc}" if at else str(exc)) from None
    sweep_data = cfg.get("sweep") or {}
    try:
        sweep = SweepSpec.model_validate(dict(sweep_data))
    except ValidationError as exc:
        raise ConfigError(_sweep_errors(exc)) from None
    if sweep.num_samples < 1:
        raise ConfigError(
            f"sweep.num_samples={sweep.num_samples}: a sweep needs at least one sample per grid "
            "point. Set sweep.num_samples=1 or more."
        )
    problems: list[str] = []
    for dim in parsed.dims:
        for value in dim.probe_values()[1:] if dim.kind != "uniform" else dim.probe_values():
            point = {**first, dim.name: value}
            try:
                spec = to_run_spec(compose(_point(parsed, point), config_dir))
            except ConfigError as exc:
                problems.append(f"At {dim.key}={hydra_value(value)} (from {dim.text}): {exc}")
                continue
            problems += check_point(spec, sweep, parsed)
    problems += check_point(base, sweep, parsed)
    uses_asha = sweep.scheduler == "asha" or (sweep.scheduler == "optuna" and sweep.asha)
    max_steps = base.trainer.max_steps
    if uses_asha and max_steps is not None and sweep.grace_period > max_steps:
        problems.append(
            f"sweep.grace_period={sweep.grace_period} is more than trainer.max_steps="
            f"{max_steps}: ASHA could never stop a trial. Set sweep.grace_period to at most "
            f"{max_steps} (a multiple of trainer.val_every_n_steps)."
        )
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))  # each message once, in order

    metric = sweep.metric or base.checkpoint.monitor or "val/loss"
    if sweep.mode is not None:
        mode = sweep.mode
    elif metric == base.checkpoint.monitor:
        mode = base.checkpoint.mode
    else:
        mode = "max" if "acc" in metric else "min"
    reported = reported_metrics(base)
    if reported is not None and metric not in reported:
        raise ConfigError(
            f"sweep.metric={metric}: recipe {base.recipe.name} does not report it at "
            f"validation; it reports {', '.join(reported) or 'nothing (no validation data)'}. "
            f"Set sweep.metric to one of those (or checkpoint.monitor)."
        )
    root = storage.normalize(base.storage.uri)
    name = sweep.name or default_name(base.recipe.name, overrides)
    if "/" in name or name in {".", ".."}:
        raise ConfigError(f"sweep.name={name!r} must be a single folder name (no '/').")
    return SweepPlan(
        parsed=parsed,
        sweep=sweep,
        base=base,
        metric=metric,
        mode=mode,
        reported=tuple(reported or ()),
        name=name,
        root=root,
        uri=storage.join(root, name),
        overrides=tuple(overrides),
        config_dir=config_dir,
    )


def _point(parsed: ParsedSweep, values: dict[str, Any]) -> list[str]:
    from forge.sweep.grammar import point_overrides

    return point_overrides(parsed, values)


def check_point(spec: RunSpec, sweep: SweepSpec, parsed: ParsedSweep) -> list[str]:
    """What a sweep refuses about one point of its space (beyond what a single run refuses)."""
    problems = []
    scaling = spec.scaling
    if scaling.use_gpu and scaling.gpus_per_worker < 1 and scaling.num_workers > 1:
        problems.append(
            f"scaling.gpus_per_worker={scaling.gpus_per_worker:g} with scaling.num_workers="
            f"{scaling.num_workers}: fractional GPUs would put two ranks of one NCCL run on the "
            "same GPU, which NCCL refuses. Use whole GPUs per worker (scaling.gpus_per_worker=1) "
            "or one worker per trial (scaling.num_workers=1) to share GPUs between trials."
        )
    if sweep.scheduler == "pbt":
        mutable = set(PBT_MUTABLE) | {
            f"recipe.params.{p}" for p in _recipe_attr(spec, "PBT_MUTABLE_PARAMS", ())
        }
        for dim in parsed.dims:
            if dim.name not in mutable:
                problems.append(
                    f"sweep=pbt cannot search {dim.name}: PBT continues one trial from another's "
                    "checkpoint, and that key cannot change within one run (model shape, data "
                    "order, world size, strategy or storage). PBT can search "
                    f"{', '.join(sorted(mutable))}; use sweep=asha or sweep=optuna for "
                    f"{dim.name}."
                )
        if not parsed.dims:
            problems.append("sweep=pbt needs at least one swept key to mutate.")
        if spec.recipe.kind == "lightning":
            problems.append(
                f"sweep=pbt with the Lightning recipe {spec.recipe.name}: PBT needs each trial to "
                "wait at every validation until Tune has decided on it, and Lightning's loop "
                "does not wait yet (its trials would train past PBT's boundaries). Use "
                "sweep=asha or sweep=optuna, or a forge-loop recipe for PBT."
            )
    return problems


def reported_metrics(spec: RunSpec) -> list[str] | None:
    """The validation metrics the recipe reports (``val/<name>``), None when unknowable here.

    A recipe may list them in a module-level ``METRICS``; otherwise a forge-loop recipe is
    built on the driver and its ``eval_fn`` applied to two validation examples (cheap for the
    shipped recipes). For a Lightning recipe without ``METRICS`` this returns None and the
    metric is checked at the trial's first validation instead.
    """
    declared = _recipe_attr(spec, "METRICS", None)
    if declared is not None:
        return sorted(declared)
    if spec.recipe.kind != "loop":
        return None
    import torch

    from forge.loop import build_recipe

    recipe = build_recipe(spec)
    if recipe.val_data is None:
        return []
    if recipe.eval_fn is None:
        return ["val/loss"]
    from torch.utils.data import DataLoader

    loader = DataLoader(recipe.val_data, batch_size=2, collate_fn=recipe.collate_fn)
    batch = next(iter(loader))
    model = recipe.build_model()
    model.eval()
    with torch.no_grad():
        names = recipe.eval_fn(model, batch)
    return sorted(f"val/{n}" for n in names)


def _recipe_attr(spec: RunSpec, name: str, default: Any) -> Any:
    from forge.recipe import import_recipe_module

    return getattr(import_recipe_module(spec.recipe.module), name, default)


def default_name(recipe: str, overrides: Sequence[str]) -> str:
    """``<recipe>-sweep-<8 hex>``: the same command maps to the same folder (so it resumes).

    Example:
        >>> default_name("digits", ["seed=0,1"]) == default_name("digits", ["seed=0,1"])
        True
    """
    keep = sorted(o for o in overrides if not o.startswith(("ray.", "verbose=")))
    digest = hashlib.sha256(json.dumps(keep).encode()).hexdigest()[:8]
    return f"{recipe}-sweep-{digest}"


def _sweep_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = "sweep." + ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(SweepSpec.model_fields))
            lines.append(f"Unknown config key '{key}'. Known keys under sweep: {known}.")
        else:
            lines.append(f"{key}={err.get('input')!r} is invalid: {err['msg']}.")
    return "\n".join(lines)


def dimension_names(dims: Sequence[Dimension]) -> list[str]:
    """The Tune config keys of the swept dimensions, in command-line order."""
    return [d.name for d in dims]
