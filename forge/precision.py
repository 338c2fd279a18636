"""Mixed precision: one place that maps ``trainer.precision`` to torch's autocast, and fp16
loss scaling for the strategies that step a torch optimizer themselves (DDP, FSDP; DeepSpeed
scales inside its engine)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from typing import Any

import torch


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context for forward passes; a no-op for full precision.

    Example:
        >>> with autocast("bf16", torch.device("cpu")):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# fp16 loss scaling state travels with checkpoints in this (small, JSON) file.
GRAD_SCALER_FILE = "grad_scaler.json"


def grad_scaler(precision: str, device: torch.device, sharded: bool = False) -> Any:
    """The loss scaler for ``precision``: dynamic loss scaling for fp16, a pass-through otherwise.

    fp16 gradients underflow to zero without it (bf16 has fp32's range and needs none). Sharded
    strategies (FSDP) get ``ShardedGradScaler``: each rank sees only its shard of the gradients,
    so whether any of them overflowed has to be agreed across ranks before a step is skipped.

    Example:
        >>> grad_scaler("bf16", torch.device("cpu")).is_enabled()
        False
        >>> grad_scaler("fp16", torch.device("cpu")).is_enabled()
        True
    """
    enabled = precision == "fp16"
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def scaled_step(
    scaler: Any,
    parameters: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    clip_norm: float | None,
) -> None:
    """One optimizer step through ``scaler``: unscale, clip, step (skipped when a gradient is
    inf/nan), update the scale, zero the gradients.

    Unscaling comes before clipping so that ``trainer.gradient_clip_val`` bounds the true
    gradient norm, not the scaled one.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> scaled_step(grad_scaler("32", torch.device("cpu")), model.parameters(), opt, 1.0)
        >>> model.weight.grad is None
        True
    """
    scaler.unscale_(optimizer)
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def grad_scaler_files(scaler: Any, rank: int) -> dict[str, bytes]:
    """Rank 0's checkpoint file with the loss scale (nothing when loss scaling is off)."""
    state = scaler.state_dict()
    if rank != 0 or not state:
        return {}
    return {GRAD_SCALER_FILE: json.dumps(state).encode()}


def load_grad_scaler(scaler: Any, ckpt: Any) -> None:
    """Restore the loss scale from ``ckpt`` (a CommittedCheckpoint) when both use fp16.

    A checkpoint without one (written in 32/bf16, or by DeepSpeed, which scales itself) leaves
    the scaler at its initial scale; it calibrates again within a few steps.
    """
    if scaler.is_enabled() and GRAD_SCALER_FILE in ckpt.manifest.files:
        scaler.load_state_dict(json.loads(ckpt.read(GRAD_SCALER_FILE)))
