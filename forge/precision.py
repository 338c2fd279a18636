"""Mixed precision: one place that maps ``trainer.precision`` to torch's autocast."""

from __future__ import annotations

import contextlib
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
