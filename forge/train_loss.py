"""The logged training loss: the mean over a logging window of every micro-batch on every rank.

The loss is summed on the device at every micro-batch (no host sync). At a log step the window
is closed on the device, and closed windows are reduced across ranks *together*, in one
asynchronous all-reduce about every :data:`REDUCE_EVERY_S` seconds, read back at the next log
step (or when a validation, a checkpoint or the end of training needs the rows): by then the
reduction is long done, so reading it costs no wait on the other ranks and no device sync on a
GPU. The values are those of a blocking reduction per window; rows are only written later,
at most about a second plus one log interval.

Why batches: one small collective cost each rank 0.4-1 ms of CPU on gloo's threads
(``torch.distributed`` on 2 CPU processes, whichever the tensor or the skew between ranks),
so one per log step was 1-2 % of a small model's step on two cores
(``scripts/bench/ddp_overhead.py --paired``). The non-finite guard's record rides in the same
collective (``check``), so a log step starts at most one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: Starts summing a tensor across ranks in place and returns a function that waits for it.
AllReduceAsync = Callable[[torch.Tensor], Callable[[], None]]

#: A finished window: its log step, its row (``train/loss`` included) and the wall-clock time
#: (``time.time()``) it was closed at.
Row = tuple[int, dict[str, Any], float]

#: Seconds between reductions of the closed windows (rank 0's clock decides, for every rank).
REDUCE_EVERY_S = 1.0
#: At most this many windows per reduction.
MAX_WINDOWS = 64


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
        rank: This worker's rank: rank 0's clock sets how many windows go in a reduction
            (every rank reads the same reduced value, so they all agree).
        check: Another reduction to ride along, as ``(record, read)``: ``record()`` gives a 1-d
            float64 tensor (on ``device``) to sum across ranks with the losses, ``read(summed)``
            gets it back as floats before any row of that reduction is returned, and may raise
            (the non-finite guard: no row of a window it covers is ever logged).
        reduce_every_s: Seconds between reductions (:data:`REDUCE_EVERY_S`; 0: one per window).

    Example:
        >>> w = TrainLossWindow(torch.device("cpu"), all_reduce_now(lambda t: None))
        >>> for loss in (1.0, 2.0, 3.0):
        ...     w.add(torch.tensor(loss))
        >>> w.end_window(3, {"lr": 0.1}, wall_time=0.0)  # reduction started; nothing to log yet
        []
        >>> w.add(torch.tensor(5.0))
        >>> w.end_window(4, {"lr": 0.1}, wall_time=1.0)  # the previous window, now complete
        [(3, {'train/loss': 2.0, 'lr': 0.1}, 0.0)]
        >>> w.flush(4)
        [(4, {'train/loss': 5.0, 'lr': 0.1}, 1.0)]
    """

    def __init__(
        self,
        device: torch.device,
        all_reduce_async: AllReduceAsync,
        *,
        rank: int = 0,
        check: tuple[Callable[[], torch.Tensor], Callable[[Sequence[float]], None]] | None = None,
        reduce_every_s: float = REDUCE_EVERY_S,
    ) -> None:
        self._device = device
        self._all_reduce_async = all_reduce_async
        self._check = check
        self._reduce_every_s = reduce_every_s
        self._lead = rank == 0
        # The open window: each step's loss sum as it came (a list append per step; summed on
        # the device when the window closes) and how many micro-batches (a host count).
        self._losses: list[torch.Tensor] = []
        self._count = 0
        # Closed windows waiting for a reduction: (step, row, loss sum on the device, count, time)
        self._closed: list[tuple[int, dict[str, Any], torch.Tensor, int, float]] = []
        self._per_reduction = 1  # windows per reduction; adapted at each read
        self._last_start = time.perf_counter()
        # The reduction started: (the step it covers up to, its windows, the tensor, its wait)
        self._in_flight: tuple[int, list[Any], torch.Tensor, Callable[[], None]] | None = None
        self._checked_up_to = -1  # the step the last check read covered

    def add(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's loss (a scalar tensor); no host sync."""
        self.add_step(loss.detach().float(), 1)

    def add_step(self, loss_sum: torch.Tensor, count: int) -> None:
        """Add the summed losses (a float scalar tensor) of ``count`` micro-batches, e.g. one
        optimizer step's; no host sync."""
        self._losses.append(loss_sum)
        self._count += count

    def end_window(
        self, step: int, row: dict[str, Any], wall_time: float | None = None
    ) -> list[Row]:
        """Close the window at log step ``step`` (call on every rank, at the same steps).

        ``row`` holds the step's other metrics (lr, throughput); ``wall_time`` defaults to now.
        Returns the rows whose reduction is complete, in step order (often none).
        """
        done = self._read()
        if self._losses:
            loss = torch.stack(self._losses).sum(dtype=torch.float32)
        else:
            loss = torch.zeros((), device=self._device)
        when = time.time() if wall_time is None else wall_time
        self._closed.append((step, row, loss, self._count, when))
        self._losses, self._count = [], 0
        if len(self._closed) >= self._per_reduction:
            self._start(step)
        return done

    def flush(self, step: int) -> list[Row]:
        """Reduce every closed window now (blocking) and return their rows; the open window
        stays open. With ``check``, it is also read up to ``step`` (the step training is at),
        with a reduction of its own if none covered that step. Call on every rank, at the same
        steps."""
        done = self._read()
        if self._closed or (self._check is not None and self._checked_up_to < step):
            self._start(step)
            done += self._read()
        return done

    def _start(self, step: int) -> None:
        windows, self._closed = self._closed, []
        now = time.perf_counter()
        # Only rank 0's clock counts: the sum every rank reads back is exactly its value.
        elapsed = now - self._last_start if self._lead else 0.0
        self._last_start = now
        host = [float(w[3]) for w in windows] + [elapsed]
        parts = [torch.tensor(host, dtype=torch.float64, device=self._device)]
        if windows:
            parts.insert(0, torch.stack([w[2] for w in windows]).to(torch.float64))
        if self._check is not None:
            parts.append(self._check[0]())
        packed = torch.cat(parts)
        self._in_flight = (step, windows, packed, self._all_reduce_async(packed))

    def _read(self) -> list[Row]:
        if self._in_flight is None:
            return []
        step, windows, packed, wait = self._in_flight
        self._in_flight = None
        wait()
        values = packed.tolist()
        n = len(windows)
        losses, counts, elapsed = values[:n], values[n : 2 * n], values[2 * n]
        if self._check is not None:
            self._check[1](values[2 * n + 1 :])
            self._checked_up_to = step
        # Enough windows that the next reduction comes about reduce_every_s after this one.
        if n:
            per_window = elapsed / n
            wanted = self._reduce_every_s / per_window if per_window > 0 else MAX_WINDOWS
            self._per_reduction = max(1, min(MAX_WINDOWS, int(wanted)))
        # A window of skipped steps only: no loss to average (nan).
        return [
            (step, {"train/loss": loss / count if count else math.nan, **row}, when)
            for (step, row, _, _, when), loss, count in zip(windows, losses, counts, strict=True)
        ]
