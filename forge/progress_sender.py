"""Rank 0's progress events to the driver, sent in batches from a background thread.

Each send is a synchronous round trip to the cluster's key-value store
(:mod:`forge.progress_channel`). Done from the training thread at every log step, on a machine
whose cores the workers already fill, those round trips take time from training. Here the
training thread only appends to a list; one thread sends whatever has gathered, as one batch, at
most every ``interval_s`` (a delay nobody watching a console notices).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]


class BatchedSender:
    """Calls ``put(batch)`` with the events gathered since the last call, in order.

    Args:
        put: Sends a list of events (e.g. :meth:`forge.progress_channel.ProgressChannel.send`);
            its errors are swallowed, since an unreachable driver must never stop training.
        interval_s: The longest an event waits for others to join its batch.

    Example:
        >>> batches = []
        >>> send = BatchedSender(batches.append, interval_s=60)
        >>> send({"event": "log", "step": 10})
        >>> send({"event": "log", "step": 20})
        >>> send.close()  # sends what is left, without waiting for the interval
        >>> [e["step"] for batch in batches for e in batch]
        [10, 20]
    """

    def __init__(self, put: Callable[[list[Event]], None], interval_s: float = 0.25) -> None:
        self._put = put
        self._interval_s = interval_s
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()  # events are waiting
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forge-progress", daemon=True)
        self._thread.start()

    def __call__(self, event: Event) -> None:
        """Queue ``event`` for the next batch; never blocks on the network."""
        with self._lock:
            self._events.append(event)
        self._wake.set()

    def close(self, timeout_s: float = 10.0) -> None:
        """Send the events still queued, then stop the thread."""
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._closing.wait(self._interval_s)  # let the next few events join this batch
            self._wake.clear()
            with self._lock:
                batch, self._events = self._events, []
            if batch:
                try:
                    self._put(batch)
                except Exception:  # an unreachable driver must never stop training
                    pass
            if self._closing.is_set():
                with self._lock:
                    if not self._events:
                        return
