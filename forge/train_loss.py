"""The logged training loss: the mean over a logging window of every micro-batch on every rank.

The loss is summed on the device at every micro-batch (no host sync). At a log step the
window's (sum, count) is all-reduced *asynchronously* and read back only when the next log step
comes, or when someone needs it sooner (a validation, a checkpoint, the end of training):
by then the reduction is long done, so reading it costs no wait on the other ranks and no
device sync on a GPU. The value is the same as a blocking reduction's; it is only written one
log interval later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: Starts summing a tensor across ranks in place and returns a function that waits for it.
AllReduceAsync = Callable[[torch.Tensor], Callable[[], None]]


def all_reduce_now(all_reduce_sum: Callable[[torch.Tensor], None]) -> AllReduceAsync:
    """An :data:`AllReduceAsync` from a blocking all-reduce (one process, tests)."""

    def start(tensor: torch.Tensor) -> Callable[[], None]:
        all_reduce_sum(tensor)
        return lambda: None

    return start


class TrainLossWindow:
    """Sums losses between log steps; yields each window's row once its reduction is read.

    Args:
        device: Where the sums live (the loss's device).
        all_reduce_async: Starts an in-place sum across ranks; returns its wait function.

    Example:
        >>> w = TrainLossWindow(torch.device("cpu"), all_reduce_now(lambda t: None))
        >>> for loss in (1.0, 2.0, 3.0):
        ...     w.add(torch.tensor(loss))
        >>> w.end_window(3, {"lr": 0.1}) is None  # reduction started; nothing to log yet
        True
        >>> w.add(torch.tensor(5.0))
        >>> w.end_window(4, {"lr": 0.1})  # the previous window, now complete
        (3, {'train/loss': 2.0, 'lr': 0.1})
        >>> w.flush()
        (4, {'train/loss': 5.0, 'lr': 0.1})
    """

    def __init__(self, device: torch.device, all_reduce_async: AllReduceAsync) -> None:
        self._device = device
        # Since the last log step: the steps' loss sums as they came (a list append per step;
        # summed on the device once per window) and how many micro-batches (a host count).
        self._losses: list[torch.Tensor] = []
        self._count = 0
        self._all_reduce_async = all_reduce_async
        self._pending: tuple[int, dict[str, Any], torch.Tensor, Callable[[], None]] | None = None

    def add(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's loss (a scalar tensor); no host sync."""
        self.add_step(loss.detach().float(), 1)

    def add_step(self, loss_sum: torch.Tensor, count: int) -> None:
        """Add the summed losses (a float scalar tensor) of ``count`` micro-batches, e.g. one
        optimizer step's; no host sync."""
        self._losses.append(loss_sum)
        self._count += count

    def end_window(self, step: int, row: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """Close the window at log step ``step``: start its reduction (call on every rank).

        ``row`` holds the step's other metrics (lr, throughput). Returns the previous window's
        ``(step, row)`` completed with ``train/loss``, or None if there was none.
        """
        previous = self.flush()
        if self._losses:
            loss = torch.stack(self._losses).sum(dtype=torch.float32)
        else:
            loss = torch.zeros((), device=self._device)
        sums = torch.stack([loss, torch.tensor(float(self._count), device=self._device)])
        self._losses, self._count = [], 0
        self._pending = (step, row, sums, self._all_reduce_async(sums))
        return previous

    def flush(self) -> tuple[int, dict[str, Any]] | None:
        """Wait for the pending window's reduction and return its ``(step, row)``, or None."""
        if self._pending is None:
            return None
        step, row, sums, wait = self._pending
        self._pending = None
        wait()
        return step, {"train/loss": (sums[0] / sums[1]).item(), **row}
