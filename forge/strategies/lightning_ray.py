"""Lightning strategies and cluster environment that take ranks and devices from Ray Train.

forge's own versions of what ``ray.train.lightning`` provides (``RayDDPStrategy``,
``RayFSDPStrategy``, ``RayDeepSpeedStrategy``, ``RayLightningEnvironment``), built on
``pytorch_lightning``, the package forge's Lightning path and its recipes use.

Why not Ray's: ``ray.train.lightning`` subclasses ``lightning.pytorch`` whenever the
``lightning`` package can be imported, and ``pytorch_lightning`` only when it cannot. The two
are separate class hierarchies, so with both packages installed (common: GPU images, and
anything that depends on ``lightning``) a ``pytorch_lightning.Trainer`` refuses every Ray
strategy ("You selected an invalid strategy name") and no Lightning run starts. What Ray's
classes add is small (the device, the sampler's ranks, the ranks from the Train context), so
forge keeps it here, bound to the package it actually runs.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.environments import LightningEnvironment


class FromRayTrain:
    """The device and the sampler's ranks of this Ray Train worker (a mixin for strategies)."""

    world_size: int
    global_rank: int

    @property
    def root_device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}


class RayTrainDDPStrategy(FromRayTrain, pl.strategies.DDPStrategy):
    """Lightning DDP on a Ray Train worker.

    Example:
        >>> isinstance(RayTrainDDPStrategy(), pl.strategies.Strategy)
        True
    """


class RayTrainFSDPStrategy(FromRayTrain, pl.strategies.FSDPStrategy):
    """Lightning FSDP on a Ray Train worker (GPUs only, as Lightning's FSDP is).

    Example:
        >>> isinstance(RayTrainFSDPStrategy(), pl.strategies.Strategy)
        True
    """


class RayTrainEnvironment(LightningEnvironment):
    """World size and ranks from the Ray Train context; Ray Train sets up the process group.

    Example:
        >>> type(RayTrainEnvironment()).__mro__[1].__name__
        'LightningEnvironment'
    """

    def world_size(self) -> int:
        import ray.train

        return ray.train.get_context().get_world_size()

    def global_rank(self) -> int:
        import ray.train

        return ray.train.get_context().get_world_rank()

    def local_rank(self) -> int:
        import ray.train

        return ray.train.get_context().get_local_rank()

    def node_rank(self) -> int:
        import ray.train

        return ray.train.get_context().get_node_rank()

    def set_world_size(self, size: int) -> None:
        """Ignored: the Train context is the source of truth."""

    def set_global_rank(self, rank: int) -> None:
        """Ignored: the Train context is the source of truth."""

    def teardown(self) -> None:
        """Nothing to undo: Ray Train owns the process group."""
