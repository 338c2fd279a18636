"""``python -m forge [overrides]`` / ``forge [overrides]``: Hydra in front, forge.train behind.

Hydra parses the command line (``--help``, ``--cfg job``, ``-m``, ``+key=``/``~key``
overrides, ``--config-dir``); forge validates first so mistakes come back as one paragraph and a
non-zero exit code instead of a traceback.
"""

from __future__ import annotations

import signal
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
    "sweep": "forge.sweep.cli:main",  # also what -m/--multirun runs
}


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    console = make_console()
    if argv and argv[0] in VERBS:
        sys.exit(_run_verb(argv[0], argv[1:], console))
    wants_help = {"--help", "-h", "--hydra-help"}.intersection(argv)
    if {"-m", "--multirun"}.intersection(argv) and not wants_help:
        # Sweeps run on Ray Tune (forge.sweep), not on Hydra's sequential basic sweeper.
        args = [a for a in argv if a not in ("-m", "--multirun")]
        sys.exit(_run_verb("sweep", args, console))
    if not _NO_PRECHECK.intersection(argv):
        overrides = [a for a in argv if not a.startswith("-") and not _is_flag_value(argv, a)]
        _exit_on_error(console, lambda: _precheck(overrides))
    sys.argv = [sys.argv[0], *argv]
    # `forge jobs stop` / `ray job stop` send SIGTERM: handle it like Ctrl-C, so the run lock is
    # released and the run can resume at once (committed checkpoints are kept either way).
    signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    _hydra_main()


def _sigterm_as_sigint(signum: int, frame: object) -> None:
    """SIGTERM does what Ctrl-C does at that moment: during ``trainer.fit`` Ray Train's own
    SIGINT handler aborts the worker group (no worker goes on writing checkpoints after the
    driver is gone); elsewhere a KeyboardInterrupt."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


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
    from forge.sweep.grammar import has_sweep_expression

    swept = has_sweep_expression(overrides)
    if swept:
        raise ConfigError(
            f"{' '.join(swept)} is a sweep expression, which only a sweep runs. Add -m "
            f"(python -m forge -m {' '.join(overrides)}) to run one trial per point on Ray Tune, "
            "or give a single value."
        )

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
        from omegaconf import OmegaConf

        from forge.api import train

        # Unresolved: iterating the ListConfig would resolve ${oc.env:...} into the secret.
        overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
        assert isinstance(overrides, list)
        console = make_console()
        _exit_on_error(console, lambda: train(cfg, overrides=overrides, console=console))

    run()
