"""Memory, said up front: the bytes per worker a strategy implies, and the peak it measured.

The estimate counts the *model states* of the ZeRO paper (Rajbhandari et al., 2020): parameters,
gradients and optimizer state. Activations, temporary all-gather buffers and the framework's own
footprint come on top; they depend on the batch and the model, not on the strategy.

Bytes per parameter, before sharding:

================  ======  =====  ===========================================================
precision         params  grads  optimizer (Adam: m, v; SGD with momentum: one buffer)
================  ======  =====  ===========================================================
32                4       4      Adam 8, SGD 4 or 0
bf16/fp16 (DDP)   4       4      as above: DDP and FSDP keep fp32 weights and cast on the fly
bf16/fp16 (ZeRO)  2       2      + 4 for DeepSpeed's fp32 master copy (also kept at 32)
================  ======  =====  ===========================================================

So mixed-precision Adam is 2 + 2 + 12 = 16 bytes per parameter unsharded. ZeRO-1 divides the
optimizer part by the number of workers, ZeRO-2 also the gradients, ZeRO-3 and FSDP (full_shard)
everything; FSDP shard_grad_op keeps whole parameters from forward to backward. Offloaded parts
are counted in host memory instead of the device's.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Model-state bytes per worker.

    Attributes:
        params, grads, optimizer: Bytes on the training device.
        offloaded: Bytes of the above kept in host memory instead (DeepSpeed offload).
    """

    params: int
    grads: int
    optimizer: int
    offloaded: int = 0

    @property
    def device_total(self) -> int:
        return self.params + self.grads + self.optimizer


def estimate_memory(
    num_params: int,
    *,
    strategy: str,
    precision: str,
    optimizer: str,
    momentum: float = 0.0,
    world_size: int = 1,
    sharding: str = "full_shard",
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> MemoryEstimate:
    """Bytes per worker for parameters, gradients and optimizer state.

    Args:
        num_params: Distinct parameters of the model (tied weights once).
        strategy: ``ddp``, ``fsdp`` or ``deepspeed_zero1/2/3[_offload]``.
        precision: ``32``, ``bf16`` or ``fp16``.
        optimizer: ``adam``, ``adamw`` or ``sgd``.
        momentum: SGD momentum (0 keeps no optimizer state).
        world_size: Workers the state is sharded over.
        sharding: FSDP's ``full_shard`` or ``shard_grad_op``.
        offload_optimizer, offload_params: DeepSpeed offload to host memory.

    Example:
        Mixed-precision Adam is 16 bytes per parameter unsharded, ZeRO-3 divides it all:

        >>> e = estimate_memory(10**9, strategy="deepspeed_zero1", precision="bf16",
        ...                     optimizer="adamw", world_size=1)
        >>> (e.params + e.grads + e.optimizer) // 10**9
        16
        >>> estimate_memory(10**9, strategy="deepspeed_zero3", precision="bf16",
        ...                 optimizer="adamw", world_size=8).device_total // 10**9
        2
    """
    deepspeed = strategy.startswith("deepspeed")
    mixed = precision != "32"
    weight = 2 if (deepspeed and mixed) else 4
    states = {"sgd": 4 if momentum else 0}.get(optimizer, 8)
    if deepspeed:
        states += 4  # DeepSpeed's fp32 master partition (a copy even at precision 32)
    params, grads, optim = num_params * weight, num_params * weight, num_params * states

    n = max(1, world_size)
    stage = int(strategy[len("deepspeed_zero")]) if deepspeed else None
    if strategy == "fsdp":
        grads, optim = grads // n, optim // n
        params = params if sharding == "shard_grad_op" else params // n
    elif stage is not None:
        optim //= n
        if stage >= 2:
            grads //= n
        if stage == 3:
            params //= n
    offloaded = 0
    if offload_optimizer:
        offloaded, optim = offloaded + optim, 0
    if offload_params:
        offloaded, params = offloaded + params, 0
    return MemoryEstimate(params, grads, optim, offloaded)


def device_memory(device: torch.device) -> int | None:
    """Total bytes of ``device`` (a GPU's memory, or the host's RAM for CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def peak_memory(device: torch.device) -> int:
    """Peak bytes this worker used: allocated GPU memory, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def gib(n: int) -> str:
    """``n`` bytes in GiB (MiB or KiB when small), for messages.

    Example:
        >>> gib(3 * 2**30), gib(5 * 2**20), gib(6144)
        ('3.00 GiB', '5.0 MiB', '6.0 KiB')
    """
    if n >= GiB / 10:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 / 10 else f"{n / 1024:.1f} KiB"


def describe(estimate: MemoryEstimate, num_params: int, strategy: str, world_size: int) -> str:
    """The start-of-run line: what each worker will hold.

    Example:
        >>> e = MemoryEstimate(params=4 * 2**20, grads=4 * 2**20, optimizer=8 * 2**20)
        >>> describe(e, 2**20, "ddp", 2)  # doctest: +NORMALIZE_WHITESPACE
        'memory per worker (ddp, 2 workers, 1,048,576 params): parameters 4.0 MiB, gradients
         4.0 MiB, optimizer state 8.0 MiB = 16.0 MiB, plus activations'
    """
    text = (
        f"memory per worker ({strategy}, {world_size} workers, {num_params:,} params): "
        f"parameters {gib(estimate.params)}, gradients {gib(estimate.grads)}, optimizer state "
        f"{gib(estimate.optimizer)} = {gib(estimate.device_total)}, plus activations"
    )
    if estimate.offloaded:
        text += f"; {gib(estimate.offloaded)} offloaded to host memory"
    return text


def memory_events(
    spec: Any, num_params: int, world_size: int, device: torch.device
) -> list[dict[str, Any]]:
    """Progress events for the start of a run: the estimate, and a warning if it cannot fit.

    Args:
        spec: The run's :class:`~forge.config.specs.RunSpec`.
        num_params: Parameters of the model (counted before sharding).
        world_size: Workers.
        device: This worker's device (its memory is what the estimate is compared with).
    """
    strategy = spec.strategy
    estimate = estimate_memory(
        num_params,
        strategy=strategy.name,
        precision=spec.trainer.precision,
        optimizer=spec.optim.name,
        momentum=spec.optim.momentum,
        world_size=world_size,
        sharding=strategy.sharding,
        offload_optimizer=strategy.offload_optimizer != "none",
        offload_params=strategy.offload_params != "none",
    )
    events: list[dict[str, Any]] = [
        {"event": "info", "message": describe(estimate, num_params, strategy.name, world_size)}
    ]
    total = device_memory(device)
    if total is not None and estimate.device_total > total:
        events.append(
            {
                "event": "warning",
                "message": f"the model states alone need {gib(estimate.device_total)} per worker "
                f"but the {device.type} has {gib(total)}: expect out-of-memory. Shard more "
                "(strategy=fsdp or deepspeed_zero3), offload (deepspeed_zero3_offload), use "
                "more workers or trainer.precision=bf16.",
            }
        )
    return events


def peak_event(peaks: list[int], device: torch.device) -> dict[str, Any]:
    """The end-of-run event: each worker's measured peak.

    Example:
        >>> peak_event([2**30, 2**29], torch.device("cpu"))["message"].split(": ")[1]
        '1.00 GiB, 0.50 GiB'
    """
    what = (
        "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "max RSS of the worker process, runtime included"
    )
    return {
        "event": "info",
        "message": f"peak memory per worker ({what}): {', '.join(gib(p) for p in peaks)}",
    }
