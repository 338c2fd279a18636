"""Every shipped YAML composes and validates, and overrides behave as Hydra users expect.

No Ray: composition and validation happen on the driver, before any worker starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from forge.config.compose import CONFIG_DIR, compose
from forge.config.specs import RunSpec
from forge.config.validate import to_run_spec
from forge.errors import ClusterError, ConfigError

CONFIGS = Path(CONFIG_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
# Groups of the training config (train.yaml's defaults); others (export/, ...) belong to verbs
# and are validated by those verbs' tests.
TRAIN_GROUPS = {
    next(iter(entry)).split("/")[-1]
    for entry in OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml"))["defaults"]
    if isinstance(entry, dict)
}
GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONFIGS.iterdir()
    if group.is_dir() and group.name in TRAIN_GROUPS - {"hydra", "experiment"}
    for option in group.glob("*.yaml")
)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict into {"a.b.c": value}."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def load_yaml(path: Path) -> dict[str, Any]:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert isinstance(data, dict)
    data.pop("defaults", None)
    return data


def test_shipped_configs_were_found() -> None:
    assert {"digits", "tabular", "tinylm", "tinylm_gpt2_gpu", "lightning_digits"} <= set(
        EXPERIMENTS
    )
    groups = {g for g, _ in GROUP_OPTIONS}
    assert {"recipe", "optim", "scaling", "strategy", "trainer", "storage", "checkpoint"} <= groups
    assert "hydra" not in groups


def test_default_config_composes_and_validates() -> None:
    cfg = compose()
    assert isinstance(cfg, DictConfig)
    assert "hydra" not in cfg
    spec = to_run_spec(cfg)
    assert isinstance(spec, RunSpec)
    assert spec.recipe.name == "digits"
    assert spec.scaling.backend == "gloo"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name: str) -> None:
    cfg = compose([f"experiment={name}"])
    spec = to_run_spec(cfg)
    assert isinstance(spec, RunSpec)
    # The experiment is composed last, so every value it pins wins over the groups' defaults.
    pinned = leaves(load_yaml(CONFIGS / "experiment" / f"{name}.yaml"))
    assert pinned, f"experiment/{name}.yaml pins nothing"
    for key, value in pinned.items():
        assert OmegaConf.select(cfg, key) == value, key


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    spec = to_run_spec(cfg)
    assert isinstance(spec, RunSpec)
    # The command-line choice wins, even over the default experiment's `override /recipe`.
    expected = load_yaml(CONFIGS / group / f"{option}.yaml")
    composed = OmegaConf.to_container(cfg[group], resolve=True)
    for key, value in leaves(expected).items():
        assert leaves(composed)[key] == value, f"{group}.{key}"


def test_group_choice_on_the_command_line_beats_the_experiment() -> None:
    spec = to_run_spec(compose(["experiment=tabular", "recipe=digits"]))
    assert spec.recipe.name == "digits"
    assert spec.data.batch_size == 32  # still the experiment's own setting
    assert spec.trainer.max_steps == 200


@pytest.mark.parametrize(
    "overrides", [["scaling=gpu"], ["experiment=tinylm_gpt2_gpu"]], ids=["scaling", "experiment"]
)
def test_gpu_configs_validate_and_fail_only_at_the_cluster_check(
    overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = to_run_spec(compose(overrides))
    assert spec.scaling.use_gpu
    assert spec.scaling.backend == "nccl"

    import ray

    from forge.cluster import check_resources

    cpu_only = [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9}}]
    monkeypatch.setattr(ray, "nodes", lambda: cpu_only)
    with pytest.raises(ClusterError, match="scaling.use_gpu=true"):
        check_resources(spec.scaling)


def test_gpu_experiment_keeps_its_settings_on_a_cpu_override() -> None:
    spec = to_run_spec(compose(["experiment=tinylm_gpt2_gpu", "scaling=cpu"]))
    assert not spec.scaling.use_gpu
    assert spec.trainer.precision == "bf16"  # bf16 is allowed on CPU; fp16 is not


# --------------------------------------------------------------------------------------------
# Overrides as Hydra users know them


def test_plain_override_sets_a_value() -> None:
    spec = to_run_spec(compose(["trainer.max_steps=7", "optim.lr=0.01", "seed=3"]))
    assert (spec.trainer.max_steps, spec.optim.lr, spec.seed) == (7, 0.01, 3)


def test_last_override_wins() -> None:
    assert (
        to_run_spec(compose(["trainer.max_steps=5", "trainer.max_steps=6"])).trainer.max_steps == 6
    )


def test_list_override() -> None:
    assert to_run_spec(compose(["optim.betas=[0.8,0.9]"])).optim.betas == (0.8, 0.9)


def test_null_override() -> None:
    spec = to_run_spec(compose(["trainer.max_steps=null", "trainer.max_epochs=2"]))
    assert spec.trainer.max_steps is None
    assert spec.trainer.max_epochs == 2


def test_recipe_param_override_reaches_the_recipe() -> None:
    spec = to_run_spec(compose(["recipe.params.channels=8"]))
    assert spec.recipe.params["channels"] == 8


def test_remove_then_add_a_valid_recipe_param() -> None:
    cfg = compose(["~recipe.params.dropout"])
    assert "dropout" not in cfg.recipe.params
    assert "dropout" not in to_run_spec(cfg).recipe.params  # the recipe's default applies

    spec = to_run_spec(compose(["~recipe.params.dropout", "+recipe.params.dropout=0.3"]))
    assert spec.recipe.params["dropout"] == 0.3


def test_add_an_unknown_recipe_param_is_rejected_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"recipe\.params\.chanels.*'channels'"):
        to_run_spec(compose(["+recipe.params.chanels=3"]))


def test_double_plus_adds_or_overrides() -> None:
    assert to_run_spec(compose(["++recipe.params.channels=4"])).recipe.params["channels"] == 4


def test_plus_on_an_existing_key_is_refused_by_hydra() -> None:
    with pytest.raises(ConfigError, match=r"recipe\.params\.channels"):
        compose(["+recipe.params.channels=3"])


def test_remove_an_optional_key_falls_back_to_the_spec_default() -> None:
    cfg = compose(["trainer.log_every_n_steps=3", "~trainer.log_every_n_steps"])
    assert "log_every_n_steps" not in cfg.trainer
    assert to_run_spec(cfg).trainer.log_every_n_steps == 10


def test_remove_a_required_key_names_it() -> None:
    with pytest.raises(ConfigError, match=r"Missing config key 'recipe\.name'"):
        to_run_spec(compose(["~recipe.name"]))


def test_remove_an_unknown_key_names_it() -> None:
    with pytest.raises(ConfigError, match=r"~trainer\.nothere: there is no such key"):
        compose(["~trainer.nothere"])


def test_lightning_precision_spellings_are_accepted() -> None:
    assert to_run_spec(compose(["trainer.precision=bf16-mixed"])).trainer.precision == "bf16"
    assert to_run_spec(compose(["trainer.precision=32-true"])).trainer.precision == "32"
    spec = to_run_spec(compose(["trainer.precision=16-mixed", "scaling=gpu"]))
    assert spec.trainer.precision == "fp16"


def test_env_interpolation_is_resolved_once(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("FORGE_TEST_STORAGE", str(tmp_path))
    spec = to_run_spec(compose(["storage.uri=${oc.env:FORGE_TEST_STORAGE}"]))
    assert spec.storage.uri == str(tmp_path)


def test_unset_env_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGE_TEST_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError, match="storage.uri"):
        to_run_spec(compose(["storage.uri=${oc.env:FORGE_TEST_UNSET_VAR}"]))


def test_specs_are_frozen() -> None:
    spec = to_run_spec(compose())
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError for frozen models
        spec.trainer.max_steps = 1  # type: ignore[misc]
