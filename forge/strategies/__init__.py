"""Distribution strategies: one backend per file, one small Protocol between them.

The forge loop only talks to a :class:`Strategy`; picking one happens in :func:`make_strategy`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import nn

from forge.checkpoint.store import CommittedCheckpoint
from forge.config.specs import StrategySpec

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Strategy(Protocol):
    """How one worker holds the model, steps it, and writes/reads its share of a checkpoint."""

    name: str

    def setup(
        self, model: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Place and wrap the model, then build the optimizer over the wrapped parameters."""
        ...

    def no_sync(self, model: nn.Module) -> AbstractContextManager[None]:
        """Skip gradient synchronization (gradient accumulation micro-steps)."""
        ...

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module inside any wrapper."""
        ...

    def checkpoint_files(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, bytes]:
        """This rank's checkpoint files (name -> bytes); names must be unique across ranks."""
        ...

    def load_checkpoint(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ckpt: CommittedCheckpoint
    ) -> None:
        """Restore model and optimizer state from a committed checkpoint."""
        ...


def make_strategy(spec: StrategySpec, rank: int, world_size: int, device: torch.device) -> Strategy:
    """The strategy named by ``strategy.name``."""
    if spec.name == "ddp":
        from forge.strategies.ddp import DDPStrategy

        return DDPStrategy(spec, rank, world_size, device)
    raise ValueError(f"unknown strategy {spec.name!r}")  # unreachable: specs validate the name
