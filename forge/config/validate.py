"""Validation: a composed config becomes a frozen RunSpec, or a ConfigError naming key and fix."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import ValidationError

from forge.config.specs import RunSpec
from forge.errors import ConfigError, did_you_mean
from forge.recipe import build_params, import_recipe_module


def to_run_spec(cfg: DictConfig | dict[str, Any]) -> RunSpec:
    """Resolve interpolations once and validate the result into a :class:`RunSpec`.

    Also imports the recipe and checks ``recipe.params`` against its ``Params``, so a missing
    recipe or a misspelt parameter fails here, on the driver, before any worker starts.

    Example:
        >>> from forge.config.compose import compose
        >>> to_run_spec(compose(["trainer.max_steps=7"])).trainer.max_steps
        7
    """
    from forge.run_folder import env_secrets, scrub

    data = resolve(cfg)
    data.pop("hydra", None)
    data.pop("sweep", None)  # the sweep group configures forge.sweep, not one run
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    secrets = env_secrets(cfg)  # errors echo inputs: never a value read from the environment
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(scrub(format_validation_error(exc, data, raw), secrets)) from None
    try:
        check_recipe(spec)
    except ConfigError as exc:
        raise ConfigError(scrub(str(exc), secrets)) from None
    return spec


def resolve(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The config as plain containers with every ``${...}`` resolved."""
    try:
        container = OmegaConf.to_container(
            cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg), resolve=True
        )
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(
            f"{key}: could not resolve its value ({exc.msg if hasattr(exc, 'msg') else exc}). "
            "Check the ${...} interpolation, or that the environment variable it reads is set."
        ) from None
    assert isinstance(container, dict)
    return container


def format_validation_error(
    exc: ValidationError, data: dict[str, Any], raw: dict[str, Any] | None = None
) -> str:
    """One paragraph per problem, each naming the full key, what is wrong, and the fix.

    A value written as an interpolation in ``raw`` (the unresolved config) is shown as written,
    so ``seed=${oc.env:TOKEN}`` never echoes the token.
    """
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            parent = ".".join(loc[:-1])
            section = _select(data, loc[:-1])
            known = _known_fields(loc[:-1])
            hint = did_you_mean(loc[-1], known)
            lines.append(
                f"Unknown config key '{key}'.{hint} Known keys under {parent or 'the root'}: "
                f"{', '.join(known)}. Remove it (~{key}) or fix its name."
                if isinstance(section, dict)
                else f"Unknown config key '{key}'. Remove it (~{key})."
            )
        elif err["type"] == "missing":
            lines.append(f"Missing config key '{key}'. Set it with +{key}=<value>.")
        elif err["type"] == "value_error":  # our own validators already name every key
            lines.append(str(err["ctx"]["error"]) + ".")
        else:
            got = err.get("input")
            written = _select(raw, loc) if raw is not None else None
            shown = written if isinstance(written, str) and "${" in written else _show(got)
            lines.append(
                f"{key}={shown} is invalid: {err['msg']}. "
                f"Fix it with {key}=<value>{_describe(loc)}."
            )
    return "\n".join(lines)


def check_recipe(spec: RunSpec) -> None:
    """Import the recipe module and validate its params and entry point."""
    mod = import_recipe_module(spec.recipe.module)
    entry = "build" if spec.recipe.kind == "loop" else "build_lightning"
    if not callable(getattr(mod, entry, None)):
        other = "build_lightning" if entry == "build" else "build"
        hint = (
            f" It defines {other}(): set recipe.kind="
            f"{'lightning' if other == 'build_lightning' else 'loop'}."
            if callable(getattr(mod, other, None))
            else ""
        )
        raise ConfigError(
            f"recipe.module={spec.recipe.module} has no {entry}() function, which "
            f"recipe.kind={spec.recipe.kind} needs.{hint}"
        )
    params = build_params(mod, spec.recipe.params)
    sized = getattr(mod, "train_size", None)  # optional: the recipe knows its size cheaply
    # A file source is sized by forge.data's pass over it (its rows are not the recipe's own).
    if spec.recipe.kind == "loop" and callable(sized) and spec.data.source is None:
        from forge.loader import check_batch_fits

        check_batch_fits(int(sized(params)), spec.data, spec.scaling.num_workers)


def _select(data: dict[str, Any], loc: list[str]) -> Any:
    for part in loc:
        if not isinstance(data, dict):
            return None
        data = data.get(part)  # type: ignore[assignment]
    return data


def _known_fields(loc: list[str]) -> list[str]:
    model: Any = RunSpec
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not hasattr(field.annotation, "model_fields"):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _describe(loc: list[str]) -> str:
    model: Any = RunSpec
    field = None
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = field.annotation
    return f" ({field.description})" if field is not None and field.description else ""


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
