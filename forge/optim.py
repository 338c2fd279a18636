"""Optimizer and learning-rate schedule from an :class:`OptimSpec`."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from forge.config.specs import OptimSpec


def make_optimizer(
    spec: OptimSpec, params: Iterable[nn.Parameter], *, fused: bool | None = None
) -> torch.optim.Optimizer:
    """Build the optimizer named by ``optim.name``.

    ``fused`` (Adam/AdamW): PyTorch's fused kernel; None uses it when every parameter is on a
    CUDA device, the fast path there (on CPU the default foreach kernels are best).

    Example:
        >>> opt = make_optimizer(OptimSpec(name="sgd", lr=0.1), torch.nn.Linear(2, 1).parameters())
        >>> type(opt).__name__
        'SGD'
    """
    params = list(params)
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    cls = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    if fused is None:
        fused = all(p.is_cuda for p in params) and bool(params)
    return cls(
        params,
        lr=spec.lr,
        betas=spec.betas,
        eps=spec.eps,
        weight_decay=spec.weight_decay,
        fused=fused or None,
    )


def make_scheduler(
    spec: OptimSpec, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, cosine or linear decay to ``lr * min_lr_ratio``.

    Optimizer step ``k`` (1-based; the scheduler's step ``s = k - 1``) trains with
    ``lr * factor(s)``: ``(s + 1) / warmup_steps`` during warm-up (so step 1 does not waste a
    zero learning rate and step ``warmup_steps`` is at the peak), then, with
    ``p = (s - warmup_steps) / (total_steps - warmup_steps)``, ``min + (1 - min) * d(p)`` where
    ``d`` is ``(1 + cos(pi p)) / 2`` (cosine) or ``1 - p`` (linear): the decay starts at the
    peak and reaches ``min_lr_ratio`` at ``total_steps``. The values are tested exactly in
    tests/unit/test_schedule_precision_provenance.py.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> spec = OptimSpec(lr=1.0, warmup_steps=2, scheduler="linear", min_lr_ratio=0.0)
        >>> sched, lrs = make_scheduler(spec, opt, total_steps=6), []
        >>> for _ in range(6):
        ...     lrs.append(sched.get_last_lr()[0]); opt.step(); sched.step()
        >>> lrs
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.scheduler == "constant":
            return 1.0
        span = max(1, total_steps - spec.warmup_steps)
        progress = min(1.0, (step - spec.warmup_steps) / span)
        if spec.scheduler == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * progress))
        else:
            decay = 1 - progress
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
