"""Each class of bad config gets one clear ConfigError naming the key and the fix.

Also through the CLI: exit code 2, the message on stderr, no traceback, no Ray.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from forge.config.compose import compose
from forge.config.validate import to_run_spec
from forge.errors import ConfigError, ForgeError

REPO = Path(__file__).resolve().parents[2]


def config_error(*overrides: str) -> str:
    """The ConfigError message that composing + validating ``overrides`` raises."""
    with pytest.raises(ConfigError) as info:
        to_run_spec(compose(list(overrides)))
    message = str(info.value)
    assert "Traceback" not in message
    return message


def test_config_error_is_a_forge_error() -> None:
    assert issubclass(ConfigError, ForgeError)


def test_unknown_key_suggests_the_close_one() -> None:
    msg = config_error("trainer.max_step=5")
    assert "trainer.max_step" in msg
    assert "Did you mean 'max_steps'?" in msg
    assert "max_epochs" in msg  # the known keys are listed


def test_unknown_root_key() -> None:
    msg = config_error("sede=1")
    assert "'sede'" in msg
    assert "'seed'" in msg


def test_unknown_added_key_is_rejected_at_validation() -> None:
    msg = config_error("+trainer.foo=1")
    assert "trainer.foo" in msg
    assert "max_steps" in msg  # the known keys are listed
    assert "~trainer.foo" in msg  # how to remove it


def test_unknown_added_key_with_a_suggestion() -> None:
    msg = config_error("+trainer.max_step=5")
    assert "trainer.max_step" in msg
    assert "'max_steps'" in msg


def test_wrong_type() -> None:
    msg = config_error("trainer.max_steps=abc")
    assert "trainer.max_steps='abc'" in msg
    assert "integer" in msg
    assert "trainer.max_steps=<value>" in msg


def test_fractional_int() -> None:
    msg = config_error("data.batch_size=1.5")
    assert "data.batch_size=1.5" in msg
    assert "integer" in msg


@pytest.mark.parametrize(
    ("override", "key", "bound"),
    [
        ("trainer.max_steps=-1", "trainer.max_steps", "greater than 0"),
        ("trainer.max_steps=0", "trainer.max_steps", "greater than 0"),
        ("optim.lr=0", "optim.lr", "greater than 0"),
        ("optim.momentum=1.5", "optim.momentum", "less than 1"),
        ("data.loader_workers=-2", "data.loader_workers", "greater than or equal to 0"),
        ("trainer.max_failures=-5", "trainer.max_failures", "greater than or equal to -1"),
    ],
)
def test_out_of_range(override: str, key: str, bound: str) -> None:
    msg = config_error(override)
    assert f"{key}=" in msg
    assert bound in msg
    assert f"Fix it with {key}=<value>" in msg


@pytest.mark.parametrize(
    ("override", "choices"),
    [
        ("trainer.precision=fp8", "'32', 'bf16' or 'fp16'"),
        ("optim.name=lion", "'adamw', 'adam' or 'sgd'"),
        ("checkpoint.mode=avg", "'min' or 'max'"),
        ("recipe.kind=banana", "'loop' or 'lightning'"),
        ("strategy.name=fsdp9", "'ddp'"),
    ],
)
def test_invalid_choice_lists_the_valid_ones(override: str, choices: str) -> None:
    key = override.split("=")[0]
    msg = config_error(override)
    assert key in msg
    assert choices in msg


def test_unknown_recipe_option_lists_available() -> None:
    msg = config_error("recipe=nope")
    assert "recipe=nope" in msg
    for name in ("digits", "tabular", "tinylm", "lightning_digits"):
        assert name in msg
    assert "configs/recipe/" in msg


def test_unknown_option_suggests_the_close_one() -> None:
    msg = config_error("experiment=tabulr")
    assert "Did you mean 'tabular'?" in msg


def test_non_existent_recipe_module() -> None:
    msg = config_error("recipe.module=recipes.nothere")
    assert "recipe.module='recipes.nothere'" in msg
    assert "cannot be imported" in msg


def test_non_existent_recipe_file(tmp_path: Path) -> None:
    msg = config_error(f"recipe.module={tmp_path}/missing.py")
    assert "no such file" in msg


def test_unknown_recipe_param_suggests_the_close_one() -> None:
    msg = config_error("recipe.params.chanels=3")
    assert "recipe.params.chanels" in msg
    assert "'channels'" in msg


def test_unknown_recipe_param_suggestion_follows_the_chosen_recipe() -> None:
    # The known-keys list must come from the recipe the user picked (tabular), not the default.
    msg = config_error("experiment=tabular", "recipe.params.hiden=3")
    assert "recipe.params.hiden" in msg
    assert "'hidden'" in msg
    assert "channels" not in msg


def test_bad_recipe_param_type() -> None:
    msg = config_error("recipe.params.channels=abc")
    assert "recipe.params.channels" in msg
    assert "integer" in msg
    assert "'abc'" in msg


def test_fp16_needs_a_gpu() -> None:
    msg = config_error("trainer.precision=fp16")
    assert "trainer.precision=fp16" in msg
    assert "scaling.use_gpu=true" in msg
    assert "bf16" in msg  # the CPU alternative


def test_both_limits_null() -> None:
    msg = config_error("trainer.max_steps=null", "trainer.max_epochs=null")
    assert "trainer.max_steps" in msg and "trainer.max_epochs" in msg
    assert "never stop" in msg


@pytest.mark.parametrize("name", ["a/b", "..", "."])
def test_run_name_must_be_one_folder(name: str) -> None:
    msg = config_error(f"run_name={name}")
    assert "run_name=" in msg
    assert "storage.uri" in msg


def test_loop_recipe_run_as_lightning() -> None:
    msg = config_error("recipe.kind=lightning")
    assert "recipe.module=recipes.digits has no build_lightning()" in msg
    assert "recipe.kind=loop" in msg  # the fix


def test_lightning_recipe_run_as_loop() -> None:
    msg = config_error("recipe=lightning_digits", "recipe.kind=loop")
    assert "no build()" in msg
    assert "recipe.kind=lightning" in msg


def test_recipe_file_without_entry_point(tmp_path: Path) -> None:
    path = tmp_path / "empty_recipe_for_errors.py"
    path.write_text("X = 1\n")
    msg = config_error(f"recipe.module={path}", "~recipe.params")
    assert "has no build()" in msg


def test_params_for_a_recipe_without_params(tmp_path: Path) -> None:
    path = tmp_path / "noparams_recipe_for_errors.py"
    path.write_text("def build(params):\n    return None\n")
    msg = config_error(f"recipe.module={path}")
    assert "takes no parameters" in msg


def test_unparseable_override() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        compose(["trainer.max_steps=[1,"])


def test_several_problems_are_all_reported() -> None:
    msg = config_error("trainer.max_steps=-1", "optim.lr=0")
    assert "trainer.max_steps" in msg and "optim.lr" in msg


# --------------------------------------------------------------------------------------------
# The CLI


def run_cli(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "forge", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = run_cli(["trainer.max_step=5"], tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert "trainer.max_step" in proc.stderr
    assert "max_steps" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert elapsed < 60, f"a config error took {elapsed:.1f}s: did it start Ray?"
    assert list(tmp_path.iterdir()) == []  # no run folder, no Hydra outputs


def test_cli_bad_config_never_imports_ray(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from forge.cli import main
        try:
            main(["trainer.max_steps=-1"])
        except SystemExit as exc:
            print("exit", exc.code, "ray_imported", "ray" in sys.modules)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "exit 2 ray_imported False" in proc.stdout, proc.stdout + proc.stderr
    assert "trainer.max_steps" in proc.stderr


def test_cli_print_config(tmp_path: Path) -> None:
    proc = run_cli(["--cfg", "job", "trainer.max_steps=7"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 7" in proc.stdout
    assert "recipe:" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []  # printing the config runs nothing


def test_cli_print_config_still_validates(tmp_path: Path) -> None:
    proc = run_cli(["--cfg", "job", "trainer.max_steps=-7"], tmp_path)
    assert proc.returncode == 2
    assert "trainer.max_steps" in proc.stderr


def test_cli_help_lists_config_groups(tmp_path: Path) -> None:
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for group in ("recipe", "strategy", "experiment", "optim", "scaling", "trainer"):
        assert f"{group}:" in out, group
    assert "digits, lightning_digits, tabular" in out
    assert "python -m forge" in out
