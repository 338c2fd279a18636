"""DeepSpeed's own checkpoint files on the Lightning path load with ``weights_only=True``.

Real DeepSpeed on CPU in one process (world size 1, an in-process gloo group), no Ray: ZeRO 1/2/3
checkpoints round-trip through forge's checkpoint engine, a booby-trapped file is refused before
it can run, and a real Lightning fit saves and resumes through ``ForgeDeepSpeedStrategy``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import deepspeed
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from pytorch_lightning.strategies.ddp import DDPStrategy

from forge.config.specs import RecipeSpec, RunSpec, ScalingSpec, StrategySpec
from forge.errors import CheckpointError
from forge.strategies import ensure_process_group
from forge.strategies.deepspeed_files import (
    SAFE_GLOBALS,
    ForgeDeepSpeedStrategy,
    load_deepspeed_file,
    safe_checkpoint_engine,
)
from forge.strategies.lightning import make_lightning_strategy

OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # rank 0's ZeRO file, fp32


def forget_deepspeed_groups() -> None:
    """DeepSpeed caches the groups it derives from the world group in module globals; after
    that group is destroyed they would point at nothing, so another module's group (before this
    one, or after it) must not meet this module's caches."""
    for name, value in vars(deepspeed.utils.groups).items():
        if re.fullmatch(r"_[A-Z_]*GROUP(_RANKS)?", name):
            setattr(deepspeed.utils.groups, name, {} if isinstance(value, dict) else None)
    deepspeed.utils.groups.mesh_device = None


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """An in-process group of one for this module, gone after it with DeepSpeed's cached groups;
    so are the launcher variables DeepSpeed and Lightning read."""
    forget_deepspeed_groups()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "LOCAL_RANK": "0",
            "RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29531",
        }.items():
            mp.setenv(key, value)
        ensure_process_group(torch.device("cpu"))
        level = deepspeed.utils.logger.level
        deepspeed.utils.logger.setLevel(logging.ERROR)
        yield
        deepspeed.utils.logger.setLevel(level)
        if dist.is_initialized():
            dist.destroy_process_group()
        forget_deepspeed_groups()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the checkpoint engine, on DeepSpeed engines directly ---------------------------------------


def engine(stage: int, precision: str, seed: int) -> Any:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eng, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, dist_init_required=False
    )
    return eng


def train_step(eng: Any, precision: str) -> None:
    x = torch.randn(2, 4, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    loss = eng(x).float().pow(2).mean()
    eng.backward(loss)
    eng.step()


def full_state(eng: Any) -> dict[str, torch.Tensor]:
    """fp32 master weights and Adam's moments by parameter, gathered (ZeRO-3 partitions them)."""
    if eng.zero_optimization_stage() < 3:
        # After a load ZeRO 1/2 link a parameter to its optimizer state only at the next step.
        eng.optimizer._lazy_init_hp_params_optimizer_state()
    state = {}
    for name, param in eng.module.named_parameters():
        state[name] = safe_get_full_fp32_param(param).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}.{key}"] = safe_get_full_optimizer_state(param, key).clone()
    return state


CLIENT_STATE = {
    "epoch": 0,
    "global_step": 1,
    "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 1}}}},
    "callbacks": {},
    "lr_schedulers": [],
}


def saved_checkpoint(folder: Path, stage: int, precision: str = "32") -> dict[str, torch.Tensor]:
    """Train one step, save under tag ``checkpoint`` (as Lightning does); the state saved."""
    eng = engine(stage, precision, seed=0)
    train_step(eng, precision)
    eng.save_checkpoint(str(folder), client_state=CLIENT_STATE, tag="checkpoint")
    return full_state(eng)


@pytest.mark.parametrize("precision", ["32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_checkpoint_loads_back_exactly_with_weights_only(
    tmp_path: Path, stage: int, precision: str
) -> None:
    saved = saved_checkpoint(tmp_path, stage, precision)
    fresh = engine(stage, precision, seed=1)
    first_weight = next(fresh.module.parameters())  # (no optimizer state before a step)
    assert not torch.equal(safe_get_full_fp32_param(first_weight), saved["0.weight"])

    stock = fresh.checkpoint_engine
    with safe_checkpoint_engine(fresh):
        _, client_state = fresh.load_checkpoint(str(tmp_path))
    assert fresh.checkpoint_engine is stock  # saving goes on through DeepSpeed's own engine

    loaded = full_state(fresh)
    assert loaded.keys() == saved.keys()
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key
    assert {k: client_state[k] for k in CLIENT_STATE} == CLIENT_STATE


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_files_hold_nothing_outside_the_allowlist(tmp_path: Path, stage: int) -> None:
    """Every non-default global in the files is allowlisted, and ZeRO 1/2 really store
    ``fragment_address`` (so the round trip above loads that dataclass)."""
    saved_checkpoint(tmp_path, stage)
    found = set()
    for path in (tmp_path / "checkpoint").glob("*.pt"):
        found |= set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    allowed = {f"{cls.__module__}.{cls.__qualname__}" for cls in SAFE_GLOBALS}
    assert found <= allowed
    assert ("deepspeed.utils.tensor_fragment.fragment_address" in found) == (stage < 3)


def test_the_fp16_loss_scaler_loads(tmp_path: Path) -> None:
    """fp16 needs a GPU, so its ``DynamicLossScaler`` is checked on its own."""
    scaler = DynamicLossScaler(
        init_scale=2.0**16,
        scale_window=1000,
        min_scale=1.0,
        delayed_shift=2,
        consecutive_hysteresis=False,
    )
    torch.save({"loss_scaler": scaler, "dynamic_loss_scale": True}, tmp_path / "optim.pt")
    loaded = load_deepspeed_file(tmp_path / "optim.pt")["loss_scaler"]
    assert type(loaded) is DynamicLossScaler and vars(loaded) == vars(scaler)


class _Trap:
    """Unpickling this creates ``marker``: stands in for any code a tampered file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_a_booby_trapped_file_is_refused_and_never_runs(tmp_path: Path) -> None:
    folder, marker = tmp_path / "ckpt", tmp_path / "pwned"
    saved_checkpoint(folder, stage=2)
    optim = folder / "checkpoint" / OPTIM_FILE
    torch.save({"optimizer_state_dict": _Trap(marker)}, optim)

    fresh = engine(2, "32", seed=1)
    with pytest.raises(CheckpointError) as refused, safe_checkpoint_engine(fresh):
        fresh.load_checkpoint(str(folder))
    message = str(refused.value)
    assert str(optim) in message and "`io.open`" in message  # torch's name for builtins.open
    assert "weights_only=True" in message
    assert not marker.exists()

    # The gap was real: DeepSpeed's stock engine runs the file's code.
    TorchCheckpointEngine().load(str(optim))
    assert marker.exists()


# -- the Lightning strategy ---------------------------------------------------------------------


def deepspeed_spec(name: str) -> RunSpec:
    return RunSpec(
        recipe=RecipeSpec(name="x", module="m", kind="lightning"),
        strategy=StrategySpec(name=name),
        scaling=ScalingSpec(use_gpu=True),
    )


@pytest.mark.parametrize(
    ("name", "stage"),
    [
        ("deepspeed_zero1", 1),
        ("deepspeed_zero2", 2),
        ("deepspeed_zero3", 3),
        ("deepspeed_zero3_offload", 3),
    ],
)
def test_make_lightning_strategy_returns_the_safe_strategy(name: str, stage: int) -> None:
    strategy = make_lightning_strategy(deepspeed_spec(name), torch.nn.Linear(2, 2))
    assert type(strategy) is ForgeDeepSpeedStrategy
    assert strategy.config["zero_optimization"]["stage"] == stage


def test_load_full_weights_is_refused() -> None:
    """Lightning would read that single file through its CheckpointIO, not forge's loader."""
    strategy = ForgeDeepSpeedStrategy(stage=3, load_full_weights=True)
    with pytest.raises(CheckpointError, match="load_full_weights"):
        strategy.load_checkpoint("anything.ckpt")


class _CPUForgeDeepSpeedStrategy(ForgeDeepSpeedStrategy):
    """Test only: ``ForgeDeepSpeedStrategy`` on the CPU accelerator, in one process.

    Lightning's DeepSpeedStrategy refuses non-CUDA accelerators in ``setup_environment`` and
    checks that device indices equal local ranks (a CPU device has none); Ray's subclass takes
    its device from a Ray Train session. Only those three things change; save and load are
    forge's.
    """

    def setup_environment(self) -> None:
        self.parallel_devices = [torch.device("cpu", 0)]
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA check

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)  # DeepSpeed reads the index as its device rank


class _Note:
    """A hyper-parameter that would not load with weights_only: forge must not save it."""


class _Module(pl.LightningModule):
    def __init__(self, seed: int, note: _Note) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
        )
        self.at_start: dict[str, torch.Tensor] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_start(self) -> None:  # after Lightning restored a checkpoint
        if self.trainer.ckpt_path is None:  # a fresh start: no optimizer state yet
            return
        self.at_start = {"global_step": torch.tensor(self.trainer.global_step)}
        self.at_start.update(full_state(self.trainer.strategy.deepspeed_engine))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(
            torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g)
        )
        return torch.utils.data.DataLoader(data, batch_size=4)


def trainer(tmp_path: Path, stage: int, max_steps: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        strategy=_CPUForgeDeepSpeedStrategy(stage=stage),
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lightning_fit_saves_and_resumes_through_the_safe_strategy(
    tmp_path: Path, stage: int
) -> None:
    first = trainer(tmp_path, stage, max_steps=3)
    first.fit(_Module(seed=0, note=_Note()))
    saved = full_state(first.strategy.deepspeed_engine)
    folder = tmp_path / "ckpt"
    first.save_checkpoint(str(folder))  # checked at save: loads with weights_only

    client_state = load_deepspeed_file(next((folder / "checkpoint").glob("*model_states.pt")))
    assert "hyper_parameters" not in client_state and "hparams_name" not in client_state

    resumed = trainer(tmp_path, stage, max_steps=5)
    module = _Module(seed=1, note=_Note())
    resumed.fit(module, ckpt_path=str(folder))
    assert int(module.at_start.pop("global_step")) == 3
    assert module.at_start.keys() == saved.keys()
    for key in saved:
        assert torch.equal(module.at_start[key], saved[key]), key
    assert resumed.global_step == 5


class _Custom:
    pass


class _StatefulCallback(pl.Callback):
    def state_dict(self) -> dict[str, Any]:
        return {"custom": _Custom()}


def test_lightning_save_refuses_a_state_that_could_not_resume(tmp_path: Path) -> None:
    trained = trainer(tmp_path, 2, max_steps=1, callbacks=[_StatefulCallback()])
    trained.fit(_Module(seed=0, note=_Note()))
    with pytest.raises(CheckpointError, match=r"_Custom`.*callback's state_dict\(\)"):
        trained.save_checkpoint(str(tmp_path / "ckpt"))


def test_lightning_resume_refuses_a_booby_trapped_file(tmp_path: Path) -> None:
    first = trainer(tmp_path, 2, max_steps=1)
    first.fit(_Module(seed=0, note=_Note()))
    folder, marker = tmp_path / "ckpt", tmp_path / "pwned"
    first.save_checkpoint(str(folder))
    torch.save({"optimizer_state_dict": _Trap(marker)}, folder / "checkpoint" / OPTIM_FILE)

    with pytest.raises(CheckpointError, match=OPTIM_FILE):
        trainer(tmp_path, 2, max_steps=2).fit(_Module(seed=1, note=_Note()), ckpt_path=str(folder))
    assert not marker.exists()
