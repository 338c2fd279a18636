"""Lightning + DeepSpeed checkpoints in forge's sharded format.

Real Lightning fits under real DeepSpeed ZeRO 1/2/3 on CPU in one process (world size 1, an
in-process gloo group), no Ray: forge's callback saves through its CheckpointStore, the runner's
``resume_path`` resumes, under the same or another ZeRO stage and from a checkpoint of two
ranks, and ``consolidate`` gives the LightningModule's state dict.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import deepspeed
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from pytorch_lightning.strategies.ddp import DDPStrategy

from forge.checkpoint import consolidate
from forge.checkpoint.serialize import bytes_to_object
from forge.checkpoint.store import CheckpointStore, CommittedCheckpoint
from forge.config.specs import (
    CheckpointSpec,
    LaunchPlan,
    RecipeSpec,
    RunSpec,
    ScalingSpec,
    StrategySpec,
    TrainerSpec,
)
from forge.errors import CheckpointError
from forge.lightning_runner import _ForgeCallback, _ForgeCheckpointIO, lightning_checkpoint_dict
from forge.loop import WorkerContext
from forge.strategies import ensure_process_group
from forge.strategies.deepspeed_files import ENGINE_COUNTERS, ForgeDeepSpeedStrategy
from forge.strategies.fragments import ShardWriter, StateReader
from forge.strategies.lightning import make_lightning_strategy, resume_path
from forge.strategies.preflight import check_resumable

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


# -- a Lightning fit under DeepSpeed on CPU, saved by forge's callback ----------------------------


class _CPUForgeDeepSpeedStrategy(ForgeDeepSpeedStrategy):
    """Test only: ``ForgeDeepSpeedStrategy`` on the CPU accelerator, in one process.

    Lightning's DeepSpeedStrategy refuses non-CUDA accelerators in ``setup_environment`` and
    checks that device indices equal local ranks (a CPU device has none); Ray's subclass takes
    its device from a Ray Train session. Only those things change; save and load are forge's.
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
    """Linear-BatchNorm-ReLU-Linear (BatchNorm: buffers too); ``frozen`` freezes the first
    layer, which then has no optimizer state and no fp32 master in DeepSpeed."""

    def __init__(self, seed: int, note: _Note, frozen: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
        )
        if frozen:
            self.net[0].requires_grad_(False)
        self.at_start: dict[str, Any] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_start(self) -> None:  # after Lightning restored a checkpoint
        if self.trainer.ckpt_path is None:  # a fresh start: no optimizer state yet
            return
        engine = self.trainer.strategy.deepspeed_engine
        self.at_start = {"global_step": self.trainer.global_step, **counters(engine)}
        self.at_start.update(full_state(engine))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        # Lightning, not DeepSpeed, steps it; restored from lightning.pt.
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(
            torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g)
        )
        return torch.utils.data.DataLoader(data, batch_size=4)


def counters(engine: Any) -> dict[str, int]:
    return {name: int(getattr(engine, name)) for name in ENGINE_COUNTERS}


def full_state(engine: Any) -> dict[str, torch.Tensor]:
    """fp32 master weights and Adam's moments of trainable parameters, gathered (ZeRO-3
    partitions them); working weights of frozen ones; buffers; the learning rate."""
    if engine.zero_optimization_stage() < 3:
        # After a load ZeRO 1/2 link a parameter to its optimizer state only at the next step.
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    state = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            with deepspeed.zero.GatheredParameters([param]):
                state[name] = param.detach().float().clone()
            continue
        state[name] = safe_get_full_fp32_param(param).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}.{key}"] = safe_get_full_optimizer_state(param, key).clone()
    for name, buffer in engine.module.named_buffers():
        state[name] = buffer.clone()
    state["lr"] = torch.tensor(engine.optimizer.optimizer.param_groups[0]["lr"])
    return state


def lightning_spec(stage: int, max_steps: int, every: int = 0) -> RunSpec:
    return RunSpec(
        recipe=RecipeSpec(name="x", module="m", kind="lightning"),
        strategy=StrategySpec(name=f"deepspeed_zero{stage}"),
        scaling=ScalingSpec(use_gpu=True),  # what the config check wants; the test runs on CPU
        trainer=TrainerSpec(max_steps=max_steps, val_every_n_steps=0),
        checkpoint=CheckpointSpec(every_n_steps=every, keep_last=None),
    )


class Fit:
    """One Lightning fit with forge's callback, saving into ``run``'s CheckpointStore."""

    def __init__(
        self, run: Path, stage: int, max_steps: int, resume: CommittedCheckpoint | None = None
    ) -> None:
        self.spec = lightning_spec(stage, max_steps, every=3)
        self.store = CheckpointStore(str(run), keep_last=None)
        plan = LaunchPlan(run_uri=str(run), config_hash="x", launch_time=time.time())
        self.io = _ForgeCheckpointIO()
        self.callback = _ForgeCallback(
            self.spec, plan, WorkerContext(), self.store, self.io, resume
        )
        self.trainer = pl.Trainer(
            strategy=_CPUForgeDeepSpeedStrategy(stage=stage),
            plugins=[self.io],
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            logger=False,
            callbacks=[self.callback],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        self.callback.trainer = self.trainer
        self.resume = resume

    def run(self, module: _Module) -> _Module:
        ckpt_path = None
        if self.resume is not None:  # what run_lightning does
            ckpt_path = resume_path(
                self.spec,
                self.resume,
                self.trainer.strategy,
                self.io.stage,
                lightning_checkpoint_dict,
            )
        self.trainer.fit(module, ckpt_path=ckpt_path)
        return module

    @property
    def engine(self) -> Any:
        return self.trainer.strategy.deepspeed_engine


def trained(run: Path, stage: int, frozen: bool = False) -> tuple[Fit, dict[str, Any]]:
    """Three steps of ZeRO-``stage``, checkpointed at step 3; the state saved there."""
    fit = Fit(run, stage, max_steps=3)
    fit.run(_Module(seed=0, note=_Note(), frozen=frozen))
    return fit, {"global_step": 3, **counters(fit.engine), **full_state(fit.engine)}


def assert_same(restored: dict[str, Any], saved: dict[str, Any]) -> None:
    assert restored.keys() == saved.keys()
    for key in saved:
        assert torch.equal(torch.as_tensor(restored[key]), torch.as_tensor(saved[key])), key


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_fit_saves_fragments_and_resumes_exactly(tmp_path: Path, stage: int) -> None:
    fit, saved = trained(tmp_path / "run", stage)
    ckpt = fit.store.latest()
    assert (
        ckpt is not None and ckpt.step == 3 and ckpt.manifest.strategy == f"deepspeed_zero{stage}"
    )
    assert sorted(ckpt.manifest.files) == [
        "lightning.pt",
        "rank0.safetensors",
        "shard-00000-of-00001.json",
        "shard-00000-of-00001.safetensors",
    ]
    state = bytes_to_object(ckpt.read("lightning.pt"))
    assert state["global_step"] == 3 and "loops" in state and len(state["lr_schedulers"]) == 1
    for dropped in ("state_dict", "optimizer_states", "hyper_parameters", "hparams_name"):
        assert dropped not in state
    assert StateReader(ckpt).meta["engine_counters"] == counters(fit.engine)

    resumed = Fit(tmp_path / "resumed", stage, max_steps=5, resume=ckpt)
    module = resumed.run(_Module(seed=1, note=_Note()))
    assert_same(module.at_start, saved)
    assert resumed.trainer.global_step == 5
    assert [c.step for c in resumed.store.committed()] == [5]  # training and saving went on


@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 3), (3, 1), (1, 2)])
def test_a_checkpoint_resumes_under_another_zero_stage(
    tmp_path: Path, saved_on: int, resumed_on: int
) -> None:
    fit, saved = trained(tmp_path / "run", saved_on)
    ckpt = fit.store.latest()
    assert ckpt is not None
    check_resumable(lightning_spec(resumed_on, 5), ckpt.uri, ckpt.manifest)  # the driver agrees
    module = Fit(tmp_path / "resumed", resumed_on, max_steps=5, resume=ckpt).run(
        _Module(seed=1, note=_Note())
    )
    assert_same(module.at_start, saved)


def test_consolidate_gives_the_lightning_modules_state_dict(tmp_path: Path) -> None:
    fit, saved = trained(tmp_path / "run", stage=3)
    ckpt = fit.store.latest()
    assert ckpt is not None
    weights = consolidate(ckpt.uri)
    fresh = _Module(seed=1, note=_Note())
    assert weights.keys() == fresh.state_dict().keys()
    fresh.load_state_dict(weights)  # strict
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved[name]), name


def split_into_two_ranks(ckpt: CommittedCheckpoint, run: Path) -> CommittedCheckpoint:
    """``ckpt`` (one rank) rewritten as two ranks' shards, each tensor cut in two halves: what
    two ranks would have written, for a world-size change that one process cannot run."""
    reader = StateReader(ckpt)
    writers = [ShardWriter(0, 2), ShardWriter(1, 2)]
    for key in reader.keys():
        shape = reader.shape(key)
        total = math.prod(shape)
        half = total // 2
        writers[0].add(key, reader.read(key, 0, half), shape, 0)
        writers[1].add(key, reader.read(key, half, total - half), shape, half)
    writers[0].meta.update(reader.meta)
    files: list[dict[str, Any]] = [w.files() for w in writers]
    files[0]["lightning.pt"] = ckpt.read("lightning.pt")
    files[0]["rank0.safetensors"] = ckpt.read("rank0.safetensors")
    store = CheckpointStore(str(run), keep_last=None)
    entries = [store.write_files(ckpt.step, f) for f in files]
    return store.commit(ckpt.step, entries, world_size=2, strategy=ckpt.manifest.strategy)


@pytest.mark.parametrize("resumed_on", [2, 3])
def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path: Path, resumed_on: int) -> None:
    fit, saved = trained(tmp_path / "run", stage=2)
    one = fit.store.latest()
    assert one is not None
    two = split_into_two_ranks(one, tmp_path / "two")
    assert sum(name.startswith("shard-") for name in two.manifest.files) == 4
    check_resumable(lightning_spec(resumed_on, 5), two.uri, two.manifest)
    module = Fit(tmp_path / "resumed", resumed_on, max_steps=5, resume=two).run(
        _Module(seed=1, note=_Note())
    )
    assert_same(module.at_start, saved)


@pytest.mark.parametrize("stage", [2, 3])
def test_frozen_parameters_are_saved_and_restored(tmp_path: Path, stage: int) -> None:
    """A frozen layer has no ZeRO master weights or optimizer state: its working weights are
    stored instead (fp32), and restored into a module that starts elsewhere."""
    fit, saved = trained(tmp_path / "run", stage, frozen=True)
    ckpt = fit.store.latest()
    assert ckpt is not None
    assert not any(k.startswith("optim/") and "net.0." in k for k in StateReader(ckpt).keys())
    assert torch.equal(consolidate(ckpt.uri)["net.0.weight"], saved["net.0.weight"])
    module = Fit(tmp_path / "resumed", stage, max_steps=5, resume=ckpt).run(
        _Module(seed=1, note=_Note(), frozen=True)
    )
    assert_same(module.at_start, saved)


# -- refusals ----------------------------------------------------------------------------------


class _Custom:
    pass


class _StatefulCallback(pl.Callback):
    def state_dict(self) -> dict[str, Any]:
        return {"custom": _Custom()}


def test_a_training_state_that_could_not_resume_is_refused_at_save(tmp_path: Path) -> None:
    fit = Fit(tmp_path / "run", 2, max_steps=3)
    fit.trainer.callbacks.append(_StatefulCallback())
    with pytest.raises(CheckpointError, match=r"lightning.pt: refused.*callback.s state_dict\(\)"):
        fit.run(_Module(seed=0, note=_Note()))
    assert fit.store.committed() == []


def test_only_staged_sharded_checkpoints_load(tmp_path: Path) -> None:
    strategy = ForgeDeepSpeedStrategy(stage=2)
    with pytest.raises(CheckpointError, match="only from a forge checkpoint"):
        strategy.load_checkpoint(str(tmp_path / "a-deepspeed-folder"))
    full = CheckpointStore(str(tmp_path / "ddp")).save(
        4, {"model.safetensors": b"x", "lightning.pt": b"x"}, strategy="ddp"
    )
    strategy.stage(full)
    with pytest.raises(CheckpointError, match="holds no forge shards.*strategy=ddp"):
        strategy.load_checkpoint(full.uri)


@pytest.mark.parametrize(
    ("name", "stage"),
    [
        ("deepspeed_zero1", 1),
        ("deepspeed_zero2", 2),
        ("deepspeed_zero3", 3),
        ("deepspeed_zero3_offload", 3),
    ],
)
def test_make_lightning_strategy_returns_the_forge_strategy(name: str, stage: int) -> None:
    spec = lightning_spec(stage, 5).model_copy(update={"strategy": StrategySpec(name=name)})
    strategy = make_lightning_strategy(spec, torch.nn.Linear(2, 2))
    assert type(strategy) is ForgeDeepSpeedStrategy
    assert strategy.config["zero_optimization"]["stage"] == stage
