"""Distribution strategies: one backend per file, one small Protocol between them.

The forge loop only talks to a :class:`Strategy`; picking one happens in :func:`make_strategy`.

* ``ddp``: :mod:`forge.strategies.ddp` (full state on every worker)
* ``fsdp``: :mod:`forge.strategies.fsdp` (FSDP2 ``fully_shard``)
* ``deepspeed_zero1/2/3[_offload]``: :mod:`forge.strategies.deepspeed`

Shared pieces: :mod:`~forge.strategies.modules` (activation checkpointing and compile, applied
in one order), :mod:`~forge.strategies.fragments` (the sharded checkpoint format every strategy
can read, and ``consolidate``), :mod:`~forge.strategies.memory` (bytes per worker, up front).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from forge.checkpoint.storage import Buffer
from forge.checkpoint.store import CommittedCheckpoint
from forge.config.specs import RunSpec


class OptimizerFactory(Protocol):
    """Builds the run's optimizer over ``params`` (:func:`forge.optim.make_optimizer`).

    ``fused``: PyTorch's fused kernel on or off; None lets the factory choose (on for CUDA).
    """

    def __call__(
        self, params: Iterable[nn.Parameter], *, fused: bool | None = None
    ) -> torch.optim.Optimizer: ...


FilePayload = Buffer | Callable[[], Buffer]


class Strategy(Protocol):
    """How one worker holds the model, steps it, and writes/reads its share of a checkpoint."""

    name: str

    def setup(
        self, model: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Place and wrap the model, then build the optimizer over the wrapped parameters."""
        ...

    def init_context(self) -> AbstractContextManager[Any]:
        """Where the recipe's model is built when ``Recipe.model`` is a function.

        A no-op except for ZeRO-3 with ``strategy.zero_init=true``, which partitions each
        parameter as it is created (``deepspeed.zero.Init``).
        """
        ...

    def no_sync(self, model: nn.Module) -> AbstractContextManager[None]:
        """Skip gradient synchronization (gradient accumulation micro-steps).

        Wraps forward *and* backward of a micro-batch that is not the last of its group.
        """
        ...

    def autocast(self, precision: str) -> AbstractContextManager[None]:
        """Mixed-precision context for forward passes (a no-op where the engine casts itself)."""
        ...

    def backward(self, model: nn.Module, loss: torch.Tensor, accumulation: int) -> None:
        """Backward for one micro-batch of a group of ``accumulation``; scales the loss."""
        ...

    def optimizer_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, clip_norm: float | None
    ) -> None:
        """After the last micro-batch of a group: clip, step, zero the gradients."""
        ...

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside any wrapper."""
        ...

    def checkpoint_files(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, FilePayload]:
        """Snapshot this rank's checkpoint state; names must be unique across ranks.

        Called with training paused. A value is bytes, or a zero-argument callable producing
        them that the checkpoint module may run in the background while training goes on:
        it must only read host-memory copies taken here, never live parameters.
        """
        ...

    def load_checkpoint(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: CommittedCheckpoint
    ) -> None:
        """Restore model and optimizer state from a committed checkpoint."""
        ...


def host_copy(state: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor copied to host memory.

    Example:
        >>> t = torch.ones(2)
        >>> copy = host_copy({"w": t, "meta": [1, t]})
        >>> _ = t.add_(1)
        >>> copy["w"].tolist()
        [1.0, 1.0]
    """
    if isinstance(state, torch.Tensor):
        # Into a buffer of an earlier snapshot when the checkpoint streamer offers one.
        from forge.checkpoint.staging import copy_to_host

        return copy_to_host(state)
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(v) for v in state)
    return state


def ensure_process_group(device: torch.device) -> None:
    """A process group of one when there is none (a single worker): FSDP and DeepSpeed need one.

    Ray Train creates the group for several workers; with one, forge makes an in-process one.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def make_strategy(spec: RunSpec, rank: int, world_size: int, device: torch.device) -> Strategy:
    """The strategy named by ``strategy.name``; it reads the options of ``spec`` it needs
    (precision, accumulation and clipping for DeepSpeed's config, ``trainer.compile``...)."""
    name = spec.strategy.name
    if name == "ddp":
        from forge.strategies.ddp import DDPStrategy

        return DDPStrategy(spec, rank, world_size, device)
    if name == "fsdp":
        from forge.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(spec, rank, world_size, device)
    if name.startswith("deepspeed_"):
        from forge.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(spec, rank, world_size, device)
    raise ValueError(f"unknown strategy {name!r}")  # unreachable: specs validate the name
