"""Host-memory buffers reused from one checkpoint snapshot to the next.

Copying a few hundred MB of state into *fresh* host memory costs mostly page faults (about 5x
the memcpy itself); into buffers that already exist it is a plain memcpy. While a
:class:`HostStaging` lease is active (``with staging.lease():`` around a strategy's
``checkpoint_files``), :func:`copy_to_host` copies each tensor into a buffer of the same shape
and dtype left by an earlier snapshot whose upload has finished. The streamer releases a lease
once its upload is done, so a buffer is never reused while its bytes may still be read.

Memory: besides the snapshots in flight, one released set of buffers is kept for the next
checkpoint (about one copy of the checkpointed state).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

import torch

_active: contextvars.ContextVar[Lease | None] = contextvars.ContextVar(
    "forge_staging_lease", default=None
)


class Lease:
    """The buffers of one snapshot: reused ones and new ones, returned together on release."""

    def __init__(self, free: dict[tuple, list[torch.Tensor]]) -> None:
        self.free = free
        self.buffers: list[torch.Tensor] = []

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like ``like``: a free one of an earlier snapshot, or a new one."""
        stack = self.free.get((tuple(like.shape), like.dtype))
        buf = stack.pop() if stack else torch.empty(like.shape, dtype=like.dtype)
        self.buffers.append(buf)
        return buf


class HostStaging:
    """A pool of host buffers for snapshots (see the module docstring).

    Example:
        >>> staging = HostStaging()
        >>> w = torch.ones(3)
        >>> with staging.lease() as first:
        ...     copy = copy_to_host(w)
        >>> staging.release(first)
        >>> with staging.lease():
        ...     again = copy_to_host(w * 2)
        >>> again.data_ptr() == copy.data_ptr(), again.tolist()  # same memory, new values
        (True, [2.0, 2.0, 2.0])
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lease(self) -> Iterator[Lease]:
        """Route :func:`copy_to_host` calls of this thread into reused buffers."""
        with self._lock:
            free, self._free = self._free, {}
        lease = Lease(free)
        token = _active.set(lease)
        try:
            yield lease
        finally:
            _active.reset(token)

    def release(self, lease: Lease) -> None:
        """Give a snapshot's buffers back; only once nothing reads them any more."""
        pool: dict[tuple, list[torch.Tensor]] = {}
        for buf in lease.buffers:
            pool.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)
        lease.buffers = []
        with self._lock:
            self._free = pool  # the newest set only: memory stays bounded


def copy_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host-memory copy of ``tensor``, into a reused buffer while a lease is active.

    Example:
        >>> t = torch.arange(3.0)
        >>> c = copy_to_host(t)
        >>> _ = t.add_(1)
        >>> c.tolist()
        [0.0, 1.0, 2.0]
    """
    lease = _active.get()
    plain = type(tensor) in (torch.Tensor, torch.nn.Parameter)
    if lease is None or not plain or tensor.layout != torch.strided or tensor.is_quantized:
        return tensor.detach().to("cpu", copy=True)
    return lease.take(tensor).copy_(tensor.detach())
