"""``python -m forge -m ...``: a sweep on Ray Tune instead of Hydra's sequential basic sweeper."""

from __future__ import annotations

from collections.abc import Sequence


def main(args: Sequence[str]) -> int:
    """Run a sweep from command-line overrides (``-m``/``--multirun`` already removed).

    ``--config-dir DIR`` (``-cd DIR``) is honoured; other Hydra flags are refused with the
    reason, since a sweep composes each trial's config itself.
    """
    from forge.errors import ConfigError
    from forge.sweep.run import sweep

    overrides: list[str] = []
    config_dir = None
    it = iter(args)
    for arg in it:
        if arg in ("--config-dir", "-cd"):
            config_dir = next(it, None)
        elif arg.startswith("--config-dir="):
            config_dir = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(
                f"{arg} is not supported with -m: a forge sweep takes overrides (and "
                "--config-dir). Print one trial's config with python -m forge --cfg job "
                "<overrides without sweep expressions>."
            )
        else:
            overrides.append(arg)
    result = sweep(overrides, config_dir=config_dir)
    return 0 if result.best_metric is not None else 1
