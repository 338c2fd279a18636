"""Hydra composition, done once on the driver.

Workers never see Hydra: :func:`compose` returns a DictConfig that
:func:`forge.config.validate.to_run_spec` turns into frozen specs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from forge.errors import ConfigError, did_you_mean

#: The shipped configs: <repo>/configs, next to the forge package.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
CONFIG_NAME = "train"


def compose(overrides: Sequence[str] = (), config_dir: str | None = None) -> DictConfig:
    """Compose the root config with Hydra overrides, as ``python -m forge`` would.

    Args:
        overrides: Hydra overrides such as ``["experiment=tinylm", "trainer.max_steps=50"]``.
        config_dir: Another primary config folder (defaults to the shipped ``configs/``).

    Returns:
        The composed (unresolved) config, without Hydra's own ``hydra`` node.

    Raises:
        ConfigError: An override names an unknown key or option, or does not parse.

    Example:
        >>> cfg = compose(["experiment=tabular", "trainer.max_steps=20"])
        >>> cfg.recipe.name, cfg.trainer.max_steps
        ('tabular', 20)
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    for item in overrides:
        if item.lstrip("+~").startswith("="):
            raise ConfigError(
                f"The override {item!r} has no key. Overrides look like key=value, "
                "+key=value (add) or ~key (remove), e.g. trainer.max_steps=3."
            )
    if GlobalHydra.instance().is_initialized():  # e.g. called inside a Hydra app or a notebook
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir or CONFIG_DIR, version_base="1.3"):
        try:
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
        except (HydraException, ValueError) as exc:  # ValueError: e.g. a value Hydra rejects
            raise explain_hydra_error(exc, overrides, config_dir) from None
    with_hydra_removed = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(with_hydra_removed, dict)
    with_hydra_removed.pop("hydra", None)
    composed = OmegaConf.create(with_hydra_removed)
    remember_overrides(composed, overrides)
    return composed


_OVERRIDES_ATTR = "_forge_overrides"


def remember_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Attach the overrides ``cfg`` was composed from (not a config key: never saved or
    validated), so ``forge.train(cfg)`` can record them and print a resume command that
    composes the same config. A copy of ``cfg`` does not keep them."""
    cfg.__dict__[_OVERRIDES_ATTR] = list(overrides)


def remembered_overrides(cfg: DictConfig) -> list[str] | None:
    """The overrides :func:`compose` made ``cfg`` from, or None when unknown."""
    found = cfg.__dict__.get(_OVERRIDES_ATTR)
    return list(found) if found is not None else None


def explain_hydra_error(
    exc: Exception, overrides: Sequence[str], config_dir: str | None = None
) -> ConfigError:
    """Turn Hydra's composition errors into one paragraph that names the key and the fix."""
    text = str(exc)
    if "--multirun" in text:  # a sweep expression (a,b / choice / range / interval) in one run
        from forge.sweep.grammar import has_sweep_expression

        swept = " ".join(has_sweep_expression(overrides)) or "an override"
        return ConfigError(
            f"{swept} is a sweep expression, which only a sweep runs. Add -m (python -m forge "
            "-m ...) or call forge.sweep([...]) to run one trial per point on Ray Tune; or give "
            "a single value."
        )
    unknown = re.search(r"Could not (?:override|append to|delete from) '([^']+)'", text)
    if unknown and "Could not override" in text or (unknown and "Could not append" in text):
        key = unknown.group(1)
        others = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key]
        return ConfigError(_unknown_key_message(key, others, config_dir))
    gone = re.search(r"Could not delete from config. '([^']+)' does not exist", text)
    if gone:
        return ConfigError(f"~{gone.group(1)}: there is no such key to remove.")
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group, _, option = missing.group(1).rpartition("/")
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        hint = did_you_mean(option, options)
        avail = f" Available: {', '.join(options)}." if options else ""
        return ConfigError(
            f"{group}={option}: there is no such {group} config.{hint}{avail} "
            f"(Config files live in configs/{group}/; add yours there or with --config-dir.)"
        )
    if "mismatched input" in text or "no viable alternative" in text or "extraneous" in text:
        return ConfigError(
            f"Could not parse the overrides {list(overrides)}: {text.splitlines()[0]} "
            "Overrides look like key=value, +key=value (add) or ~key (remove)."
        )
    return ConfigError(f"Could not compose the config: {text}")


def _unknown_key_message(key: str, overrides: Sequence[str], config_dir: str | None) -> str:
    parent, _, leaf = key.rpartition(".")
    try:  # the user's other overrides pick the recipe/groups whose keys are the right hints
        base = compose(overrides, config_dir)
        node = OmegaConf.select(base, parent) if parent else base
        siblings = list(node.keys()) if isinstance(node, DictConfig) else []
    except ConfigError:
        siblings = []
    hint = did_you_mean(leaf, [str(s) for s in siblings])
    known = (
        f" Known keys under {parent or 'the root'}: {', '.join(map(str, siblings))}."
        if (siblings)
        else ""
    )
    return (
        f"Unknown config key '{key}'.{hint}{known} To add a new key on purpose, write +{key}=... ."
    )
