"""DDP: every worker holds the whole model; gradients are all-reduced in buckets.

Checkpoints: rank 0 writes the (identical) model and optimizer state once; every rank can read
them back, so a DDP checkpoint resumes on any number of workers, and under every other strategy.
DDP also resumes from sharded (FSDP, ZeRO) checkpoints: it assembles the full state from them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from forge.checkpoint.serialize import (
    bytes_to_object,
    bytes_to_tensors,
    object_to_bytes,
    tensors_to_bytes,
)
from forge.checkpoint.store import CommittedCheckpoint
from forge.config.specs import RunSpec
from forge.precision import (
    autocast,
    grad_scaler,
    grad_scaler_files,
    load_grad_scaler,
    scaled_step,
)
from forge.strategies import FilePayload, OptimizerFactory, host_copy
from forge.strategies.fragments import MODEL_FILE, OPTIM_FILE, StateReader, is_sharded
from forge.strategies.modules import prepare


class DDPStrategy:
    name = "ddp"

    def __init__(self, spec: RunSpec, rank: int, world_size: int, device: torch.device) -> None:
        self.spec = spec.strategy
        self.run = spec
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.scaler = grad_scaler(spec.trainer.precision, device)

    def setup(
        self, model: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device)
        # Activation checkpointing, then compile, then the DDP wrapper (see strategies.modules).
        prepare(
            model,
            activation_checkpointing=self.spec.activation_checkpointing,
            compile_model=self.run.trainer.compile,
            block_classes=self.spec.block_classes,
        )
        if self.world_size > 1 and dist.is_initialized():
            model = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                bucket_cap_mb=self.spec.bucket_cap_mb,
                find_unused_parameters=self.spec.find_unused_parameters,
                gradient_as_bucket_view=self.spec.gradient_as_bucket_view,
            )
        return model, make_optimizer(model.parameters())

    def init_context(self) -> AbstractContextManager[None]:
        return nullcontext()  # built whole on every worker (identical: same seed)

    def no_sync(self, model: nn.Module) -> AbstractContextManager[None]:
        return model.no_sync() if isinstance(model, DistributedDataParallel) else nullcontext()

    def autocast(self, precision: str) -> AbstractContextManager[None]:
        return autocast(precision, self.device)

    def backward(self, model: nn.Module, loss: torch.Tensor, accumulation: int) -> None:
        # (no division when not accumulating: one device op less per step)
        self.scaler.scale(loss / accumulation if accumulation > 1 else loss).backward()

    def optimizer_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, clip_norm: float | None
    ) -> None:
        # DDP's gradients are identical on every rank: every rank skips the same fp16 steps.
        scaled_step(self.scaler, model.parameters(), optimizer, clip_norm)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def checkpoint_files(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, FilePayload]:
        if self.rank != 0:  # replicas are identical: one copy is enough
            return {}
        # Host copies now (training is paused); serialization may run later, in background.
        model_state = host_copy(self.unwrap(model).state_dict())
        optim_state = host_copy(optimizer.state_dict())
        return {
            MODEL_FILE: lambda: tensors_to_bytes(model_state),
            OPTIM_FILE: lambda: object_to_bytes(optim_state),
            **grad_scaler_files(self.scaler, self.rank),
        }

    def load_checkpoint(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: CommittedCheckpoint
    ) -> None:
        module = self.unwrap(model)
        load_grad_scaler(self.scaler, ckpt)
        if is_sharded(ckpt):
            self._load_sharded(module, optimizer, ckpt)
            return
        state = bytes_to_tensors(ckpt.read(MODEL_FILE))
        module.load_state_dict(state)
        if OPTIM_FILE in ckpt.manifest.files:
            optimizer.load_state_dict(bytes_to_object(ckpt.read(OPTIM_FILE), OPTIM_FILE))

    def _load_sharded(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, ckpt: CommittedCheckpoint
    ) -> None:
        """Assemble full weights and optimizer state from every rank's fragments."""
        names = [name for name, _ in module.named_parameters()]
        reader = StateReader(ckpt, names)
        module.load_state_dict({k: reader.full(f"model/{k}") for k in module.state_dict()})
        if not reader.keys("optim/"):
            return
        index = {name: i for i, name in enumerate(names)}
        groups = []
        for group in optimizer.state_dict()["param_groups"]:
            groups.append(dict(group))
        reader.apply_param_groups(groups)
        state = {
            index[name]: {k: reader.full(f"optim/{k}/{name}") for k in reader.optim_keys(name)}
            for name in names
        }
        optimizer.load_state_dict({"state": state, "param_groups": groups})
