"""``python -m forge [overrides]`` / ``forge [overrides]``: Hydra in front, forge.train behind.

Hydra parses the command line (``--help``, ``--cfg job``, ``-m``, ``+key=``/``~key``
overrides, ``--config-dir``); forge validates first so mistakes come back as one paragraph and a
non-zero exit code instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from forge.errors import ClusterError, ConfigError, ForgeError
from forge.progress import make_console

EXIT_TRAINING_FAILED = 1
EXIT_BAD_CONFIG = 2

# Flags after which Hydra does something other than run once with the shipped configs.
_NO_PRECHECK = {
    "--help",
    "-h",
    "--hydra-help",
    "-m",
    "--multirun",
    "--info",
    "-i",
    "--config-dir",
    "-cd",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--shell-completion",
    "-sc",
    "--version",
}


# ``python -m forge VERB ...``: verbs other than training. Each maps to "module:function"; the
# function takes the remaining arguments and returns the exit code. Modules load only when used.
VERBS: dict[str, str] = {
    "export": "forge.export.cli:main",
    "submit": "forge.jobs_cli:submit_main",
    "jobs": "forge.jobs_cli:jobs_main",
    "validate-data": "forge.data.cli:validate_main",
    "infer-contract": "forge.data.cli:infer_main",
    "registry": "forge.mlops.cli:registry_main",
    "score": "forge.mlops.cli:score_main",
    "monitor": "forge.mlops.cli:monitor_main",
}


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    console = make_console()
    if argv and argv[0] in VERBS:
        sys.exit(_run_verb(argv[0], argv[1:], console))
    if not _NO_PRECHECK.intersection(argv):
        overrides = [a for a in argv if not a.startswith("-") and not _is_flag_value(argv, a)]
        _exit_on_error(console, lambda: _precheck(overrides))
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


def _run_verb(verb: str, args: list[str], console: Console) -> int:
    """Run ``python -m forge VERB args``; forge errors become one paragraph and an exit code."""
    import importlib

    module_name, _, func_name = VERBS[verb].partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    code: list[int] = [0]

    def call() -> None:
        code[0] = int(func(args) or 0)

    _exit_on_error(console, call)
    return code[0]


def _precheck(overrides: list[str]) -> None:
    from forge.config.compose import compose
    from forge.config.validate import to_run_spec

    to_run_spec(compose(overrides))


def _is_flag_value(argv: list[str], arg: str) -> bool:
    i = argv.index(arg)
    return i > 0 and argv[i - 1] in {"--cfg", "-c", "--package", "-p", "--resolve"}


def _exit_on_error(console: Console, fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
    except (ConfigError, ClusterError) as exc:
        console.print(
            f"[bold red]forge: configuration error[/]\n{escape(str(exc))}", highlight=False
        )
        sys.exit(EXIT_BAD_CONFIG)
    except ForgeError as exc:
        console.print(
            f"[bold red]forge: {type(exc).__name__}[/]\n{escape(str(exc))}", highlight=False
        )
        sys.exit(EXIT_TRAINING_FAILED)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; committed checkpoints are kept (resume=auto)")
        sys.exit(130)


def _hydra_main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from forge.config.compose import CONFIG_DIR, CONFIG_NAME

    @hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base="1.3")
    def run(cfg: DictConfig) -> None:
        from forge.api import train

        overrides = list(HydraConfig.get().overrides.task)
        console = make_console()
        _exit_on_error(console, lambda: train(cfg, overrides=overrides, console=console))

    run()
