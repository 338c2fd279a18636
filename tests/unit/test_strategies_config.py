"""Strategy selection, options and refusals, all on the driver: no Ray, no process group.

Covers the config group (every ``strategy=`` option validates), the cross-checks that name
both keys, the memory arithmetic, DeepSpeed's generated config, the Lightning mapping and the
pre-launch resume checks.
"""

from __future__ import annotations

import pytest

from forge.checkpoint.manifest import FileEntry, Manifest
from forge.config.compose import compose
from forge.config.validate import to_run_spec
from forge.errors import CheckpointError, ConfigError
from forge.strategies.deepspeed import deepspeed_config
from forge.strategies.memory import estimate_memory, memory_events
from forge.strategies.preflight import check_resumable

STRATEGIES = [
    "ddp",
    "fsdp",
    "deepspeed_zero1",
    "deepspeed_zero2",
    "deepspeed_zero3",
    "deepspeed_zero3_offload",
]


def spec(*overrides: str):
    return to_run_spec(compose(list(overrides)))


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        spec(*overrides)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# selection and options


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_is_one_override_for_every_recipe(name: str) -> None:
    for experiment in ("digits", "tabular", "tinylm"):
        s = spec(f"experiment={experiment}", f"strategy={name}")
        assert s.strategy.name == name


def test_zero_stage_and_offload_defaults() -> None:
    assert spec("strategy=ddp").strategy.zero_stage is None
    assert spec("strategy=deepspeed_zero2").strategy.zero_stage == 2
    offload = spec("strategy=deepspeed_zero3_offload").strategy
    assert (offload.zero_stage, offload.offload_optimizer, offload.offload_params) == (
        3,
        "cpu",
        "cpu",
    )


def test_options_of_another_strategy_are_refused_by_name() -> None:
    msg = config_error("strategy.name=fsdp")  # ddp.yaml's keys stay: the group was not switched
    assert "strategy.bucket_cap_mb is not an option of strategy=fsdp" in msg
    assert "strategy=fsdp, not strategy.name=fsdp" in msg
    msg = config_error("strategy=fsdp", "+strategy.offload_params=cpu")
    assert "strategy.offload_params" in msg and "strategy=fsdp" in msg


def test_unknown_strategy_key_is_refused() -> None:
    msg = config_error("strategy=fsdp", "+strategy.shardin=full_shard")
    assert "strategy.shardin" in msg and "'sharding'" in msg


def test_unknown_strategy_name_lists_the_choices() -> None:
    msg = config_error("strategy.name=zero9")
    for name in STRATEGIES:
        assert f"'{name}'" in msg


# --------------------------------------------------------------------------------------------
# combinations that cannot work fail before launch, naming both keys


def test_fp16_on_cpu_names_both_keys() -> None:
    msg = config_error("strategy=deepspeed_zero2", "trainer.precision=fp16")
    assert "trainer.precision=fp16" in msg and "scaling.use_gpu" in msg


def test_param_offload_needs_zero3() -> None:
    msg = config_error("strategy=deepspeed_zero2", "strategy.offload_params=cpu")
    assert "strategy.offload_params=cpu" in msg and "strategy=deepspeed_zero2" in msg
    assert "deepspeed_zero3_offload" in msg
    # ZeRO-Offload of the optimizer alone works with stage 1 and 2.
    assert spec("strategy=deepspeed_zero2", "strategy.offload_optimizer=cpu")


def test_nvme_offload_is_refused_until_checkpoints_can_read_it() -> None:
    for key in ("strategy.offload_optimizer=nvme", "strategy.offload_params=nvme"):
        msg = config_error("strategy=deepspeed_zero3_offload", key, "strategy.nvme_path=/nvme")
        assert key in msg and "not supported yet" in msg
        assert "strategy=deepspeed_zero3_offload" in msg  # what works


def test_deepspeed_batch_must_divide_over_workers_and_accumulation() -> None:
    msg = config_error(
        "strategy=deepspeed_zero2",
        "strategy.train_batch_size=100",
        "scaling.num_workers=3",
        "trainer.accumulate_grad_batches=2",
    )
    assert "strategy.train_batch_size=100" in msg and "scaling.num_workers=3" in msg
    assert "trainer.accumulate_grad_batches=2" in msg
    msg = config_error("strategy=deepspeed_zero2", "strategy.train_batch_size=64")
    assert "strategy.train_batch_size=64" in msg and "data.batch_size=64" in msg
    ok = spec("strategy=deepspeed_zero2", "strategy.train_batch_size=128")
    assert ok.strategy.train_batch_size == 128


@pytest.mark.parametrize("name", ["fsdp", "deepspeed_zero2", "deepspeed_zero3_offload"])
def test_lightning_fsdp_and_deepspeed_are_refused_on_cpu(name: str) -> None:
    msg = config_error("experiment=lightning_digits", f"strategy={name}")
    assert f"strategy={name}" in msg and "recipe.kind=lightning" in msg
    assert "scaling.use_gpu=true" in msg and "refuse the CPU" in msg
    # With GPUs the config is valid (the cluster check decides whether there are any).
    assert spec("experiment=lightning_digits", f"strategy={name}", "scaling=gpu")


def test_lightning_refuses_loop_only_options() -> None:
    msg = config_error("experiment=lightning_digits", "trainer.compile=true")
    assert "trainer.compile=true" in msg and "recipe.kind=lightning" in msg


# --------------------------------------------------------------------------------------------
# DeepSpeed's config and the Lightning mapping


def test_deepspeed_config_maps_forge_keys() -> None:
    s = spec(
        "strategy=deepspeed_zero3_offload",
        "data.batch_size=8",
        "trainer.accumulate_grad_batches=4",
        "trainer.gradient_clip_val=0.5",
        "trainer.precision=bf16",
    )
    cfg = deepspeed_config(s, world_size=2)
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 8 * 4 * 2
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    plain = deepspeed_config(spec("strategy=deepspeed_zero1"), world_size=1)
    assert plain["gradient_clipping"] == 0.0 and "bf16" not in plain
    assert "offload_optimizer" not in plain["zero_optimization"]


def test_lightning_strategy_mapping() -> None:
    """Every strategy is a pytorch_lightning one (the Trainer forge builds refuses others)."""
    import pytorch_lightning as pl

    from forge.strategies.lightning import deepspeed_kwargs, make_lightning_strategy
    from recipes.lightning_digits import DigitsModule

    module = DigitsModule()
    lightning = ("experiment=lightning_digits", "scaling=gpu")
    ddp = make_lightning_strategy(spec(*lightning), module)
    assert isinstance(ddp, pl.strategies.DDPStrategy)
    fsdp = make_lightning_strategy(spec(*lightning, "strategy=fsdp"), module)
    assert isinstance(fsdp, pl.strategies.FSDPStrategy)
    assert fsdp._state_dict_type == "full"  # checkpoints reach forge as one dict
    ds_spec = spec(*lightning, "strategy=deepspeed_zero3_offload")
    assert deepspeed_kwargs(ds_spec) == {
        "stage": 3,
        "offload_optimizer": True,
        "offload_parameters": True,
        "offload_optimizer_device": "cpu",
        "offload_params_device": "cpu",
    }
    deepspeed = make_lightning_strategy(ds_spec, module)
    assert isinstance(deepspeed, pl.strategies.DeepSpeedStrategy)


# --------------------------------------------------------------------------------------------
# memory, said up front


def test_mixed_precision_adam_is_16_bytes_per_parameter_unsharded() -> None:
    for strategy in ("ddp", "deepspeed_zero1"):
        e = estimate_memory(1000, strategy=strategy, precision="bf16", optimizer="adamw")
        assert e.device_total == 16 * 1000
    e = estimate_memory(1000, strategy="deepspeed_zero1", precision="bf16", optimizer="adamw")
    assert (e.params, e.grads, e.optimizer) == (2000, 2000, 12000)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        # bf16 Adam, 8 workers, bytes per parameter: (params, grads, optimizer)
        ("ddp", (4, 4, 8)),
        ("deepspeed_zero1", (2, 2, 12 / 8)),
        ("deepspeed_zero2", (2, 2 / 8, 12 / 8)),
        ("deepspeed_zero3", (2 / 8, 2 / 8, 12 / 8)),
        ("fsdp", (4 / 8, 4 / 8, 8 / 8)),
    ],
)
def test_zero_stages_shard_parts_of_it(strategy: str, expected: tuple[float, ...]) -> None:
    n = 8 * 1000
    e = estimate_memory(n, strategy=strategy, precision="bf16", optimizer="adam", world_size=8)
    assert (e.params, e.grads, e.optimizer) == tuple(int(x * n) for x in expected)


def test_offload_moves_bytes_to_the_host() -> None:
    e = estimate_memory(
        1000,
        strategy="deepspeed_zero3_offload",
        precision="32",
        optimizer="adamw",
        world_size=2,
        offload_optimizer=True,
        offload_params=True,
    )
    assert (e.params, e.optimizer) == (0, 0)
    assert e.grads == 4 * 1000 // 2
    assert e.offloaded == (4 + 12) * 1000 // 2


def test_sgd_and_fsdp_shard_grad_op() -> None:
    plain = estimate_memory(100, strategy="ddp", precision="32", optimizer="sgd")
    assert plain.optimizer == 0
    momentum = estimate_memory(100, strategy="ddp", precision="32", optimizer="sgd", momentum=0.9)
    assert momentum.optimizer == 400
    e = estimate_memory(
        100,
        strategy="fsdp",
        precision="32",
        optimizer="adam",
        world_size=4,
        sharding="shard_grad_op",
    )
    assert (e.params, e.grads, e.optimizer) == (400, 100, 200)


def test_memory_events_warn_when_the_estimate_exceeds_the_device() -> None:
    import torch

    s = spec("strategy=ddp")
    events = memory_events(s, 1000, 2, torch.device("cpu"))
    assert [e["event"] for e in events] == ["info"]
    assert "memory per worker (ddp, 2 workers, 1,000 params)" in events[0]["message"]
    huge = memory_events(s, 10**15, 2, torch.device("cpu"))  # 16 PB of model states
    assert huge[-1]["event"] == "warning" and "expect out-of-memory" in huge[-1]["message"]


# --------------------------------------------------------------------------------------------
# resume checks before launch


def manifest(strategy: str, world_size: int, *names: str) -> Manifest:
    entry = FileEntry.of(b"x")
    return Manifest(
        step=10, world_size=world_size, strategy=strategy, files={n: entry for n in names}
    )


def shards(world_size: int) -> list[str]:
    return [
        f"shard-{r:05d}-of-{world_size:05d}.{ext}"
        for r in range(world_size)
        for ext in ("json", "safetensors")
    ]


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("target", STRATEGIES)
def test_loop_checkpoints_reshard_to_any_strategy_and_world_size(target: str, workers: int) -> None:
    s = spec(f"strategy={target}", f"scaling.num_workers={workers}")
    check_resumable(s, "ckpt", manifest("ddp", 2, "model.safetensors", "optim.pt"))
    for source in ("fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        check_resumable(s, "ckpt", manifest(source, 2, *shards(2)))


def test_a_checkpoint_missing_a_ranks_shard_cannot_be_resharded() -> None:
    files = [n for n in shards(3) if "00001-of" not in n]
    with pytest.raises(ConfigError, match=r"cannot reshard .*rank\(s\) \[1\] are missing"):
        check_resumable(spec("strategy=fsdp"), "ckpt", manifest("fsdp", 3, *files))


def test_lightning_deepspeed_checkpoints_reshard_to_any_stage_and_world_size() -> None:
    saved = manifest("deepspeed_zero2", 2, "lightning.pt", "rank0.safetensors", *shards(2))
    for stage in (1, 2, 3):
        for workers in (1, 2, 3):
            check_resumable(
                spec(
                    "experiment=lightning_digits",
                    "scaling=gpu",
                    f"scaling.num_workers={workers}",
                    f"strategy=deepspeed_zero{stage}",
                ),
                "ckpt",
                saved,
            )
    lost = [n for n in saved.files if "00001-of" not in n]
    with pytest.raises(ConfigError, match=r"rank\(s\) \[1\] are missing"):
        check_resumable(
            spec("experiment=lightning_digits", "scaling=gpu", "strategy=deepspeed_zero3"),
            "ckpt",
            manifest("deepspeed_zero2", 2, *lost),
        )


def test_lightning_deepspeed_and_full_checkpoints_do_not_resume_each_other() -> None:
    sharded = manifest("deepspeed_zero2", 2, "lightning.pt", *shards(2))
    full = manifest("ddp", 2, "model.safetensors", "optim.pt", "lightning.pt")
    lightning = ("experiment=lightning_digits", "scaling=gpu")
    with pytest.raises(ConfigError) as info:
        check_resumable(spec(*lightning, "strategy=fsdp"), "ckpt", sharded)
    assert "Resume with a deepspeed_* strategy" in str(info.value)
    assert "forge.checkpoint.consolidate(uri)" in str(info.value)
    with pytest.raises(ConfigError, match="Resume with strategy=ddp or strategy=fsdp"):
        check_resumable(spec(*lightning, "strategy=deepspeed_zero3"), "ckpt", full)
    check_resumable(spec(*lightning, "strategy=fsdp"), "ckpt", full)


def test_deepspeed_files_of_an_older_forge_are_refused() -> None:
    saved = manifest(
        "deepspeed_zero2",
        2,
        "ds-checkpoint--mp_rank_00_model_states.pt",
        "ds-checkpoint--zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "ds-checkpoint--zero_pp_rank_1_mp_rank_00_optim_states.pt",
    )
    lightning_ds = ("experiment=lightning_digits", "scaling=gpu", "strategy=deepspeed_zero2")
    with pytest.raises(CheckpointError, match="written by an older forge and is not loadable"):
        check_resumable(spec(*lightning_ds, "scaling.num_workers=2"), "ckpt", saved)


def test_checkpoints_do_not_cross_between_lightning_and_loop_recipes() -> None:
    loop_ckpt = manifest("ddp", 2, "model.safetensors", "optim.pt")
    with pytest.raises(ConfigError, match="written by a forge-loop recipe"):
        check_resumable(spec("experiment=lightning_digits"), "ckpt", loop_ckpt)
    for lightning_ckpt in (
        manifest("ddp", 2, "model.safetensors", "optim.pt", "lightning.pt"),
        manifest("deepspeed_zero3", 2, "lightning.pt", *shards(2)),
    ):
        with pytest.raises(ConfigError, match="written by a Lightning recipe"):
            check_resumable(spec("strategy=deepspeed_zero3"), "ckpt", lightning_ckpt)


def test_zero_init_is_a_zero3_option() -> None:
    msg = config_error("strategy=deepspeed_zero2", "strategy.zero_init=true")
    assert "strategy.zero_init=true" in msg and "strategy=deepspeed_zero2" in msg
    assert "strategy=deepspeed_zero3" in msg  # what works


def test_lightning_fsdp_hands_the_capture_path_to_forge(tmp_path, monkeypatch) -> None:
    """Lightning's FSDP strategy passes ``Path(filepath)`` on; forge still captures the dict
    (found on an H200: the checkpoint went to a file named 'forge-capture:/checkpoint')."""
    from forge.lightning_runner import _ForgeCheckpointIO
    from forge.strategies.lightning import CAPTURE_PATH
    from forge.strategies.lightning_ray import RayTrainFSDPStrategy

    monkeypatch.chdir(tmp_path)
    strategy = RayTrainFSDPStrategy(state_dict_type="full")
    io = _ForgeCheckpointIO()
    strategy.checkpoint_io = io
    strategy.save_checkpoint({"global_step": 5}, CAPTURE_PATH)
    assert io.take() == {"global_step": 5}
    assert list(tmp_path.iterdir()) == []  # nothing written beside the run
