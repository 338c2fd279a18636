"""Distribution strategies: one backend per file, one small Protocol between them.

The forge loop only talks to a :class:`Strategy`; picking one happens in :func:`make_strategy`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from forge.checkpoint.store import CommittedCheckpoint
from forge.config.specs import StrategySpec

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
FilePayload = bytes | Callable[[], bytes]


class Strategy(Protocol):
    """How one worker holds the model, steps it, and writes/reads its share of a checkpoint."""

    name: str

    def setup(
        self, model: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Place and wrap the model, then build the optimizer over the wrapped parameters."""
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
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(v) for v in state)
    return state


def make_strategy(spec: StrategySpec, rank: int, world_size: int, device: torch.device) -> Strategy:
    """The strategy named by ``strategy.name``."""
    if spec.name == "ddp":
        from forge.strategies.ddp import DDPStrategy

        return DDPStrategy(spec, rank, world_size, device)
    raise ValueError(f"unknown strategy {spec.name!r}")  # unreachable: specs validate the name
