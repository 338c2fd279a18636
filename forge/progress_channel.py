"""Rank 0's progress events to the driver, through the Ray cluster's key-value store.

Every run used to create a ``ray.util.queue.Queue`` for this. A queue is an actor, and every
actor is a Python worker process that Ray starts for the run; on a machine the training workers
already fill, starting it delays their first step. On this project's 2-core machine, time to
first step was 1.026x a bare Ray Train loop's with the queue and 1.003x without it (12
alternating rounds each, ``python scripts/bench/ddp_overhead.py --steps 30 --repeats 12
--baseline-threads 1``; issue 16).

The cluster's GCS runs anyway, and its key-value store (``ray.experimental.internal_kv``, which
Ray's own libraries use for small shared state) carries the events instead:

* rank 0 writes its n-th batch of events under ``<channel>/<n>``, n = 0, 1, ... (JSON, never
  pickle);
* the driver reads keys n, n+1, ... in order until one is missing, deleting each one it read,
  so events arrive once and in order, and nothing stays behind when the run ends;
* the driver also bumps ``<channel>/alive`` every :data:`HEARTBEAT_S`; a worker that sees it
  unchanged for :data:`DRIVER_TIMEOUT_S` (its own clock, so clock skew between nodes does not
  matter) takes the driver for dead and stops before its next commit.

The store is reached through :class:`RayKV` only: its functions are Ray's underscore API, so a
change in Ray touches that class and nothing else.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Protocol

Event = dict[str, Any]

#: Seconds between the driver's heartbeats.
HEARTBEAT_S = 2.0
#: Seconds without a heartbeat after which a worker takes its driver for dead. Generous: a false
#: "dead" ends a healthy run, while Ray itself kills a dead driver's workers within seconds
#: (they are the driver's actors); this is the second line of defence.
DRIVER_TIMEOUT_S = 120.0
#: The store's namespace for every forge channel.
NAMESPACE = "forge-progress"


class KV(Protocol):
    """What a channel needs of a key-value store: bytes in, bytes (or None) out."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...

    def delete(self, key: str) -> None: ...


class RayKV:
    """The connected Ray cluster's GCS key-value store, in :data:`NAMESPACE`."""

    def get(self, key: str) -> bytes | None:
        from ray.experimental.internal_kv import _internal_kv_get

        return _internal_kv_get(key, namespace=NAMESPACE)

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(key, value, overwrite=True, namespace=NAMESPACE)

    def delete(self, key: str) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(key, namespace=NAMESPACE)


class ProgressChannel:
    """One run attempt's channel: rank 0 :meth:`send`\\ s, the driver :meth:`receive`\\ s.

    The driver creates it and passes it to the workers (it pickles to its id alone); only
    rank 0 sends. ``kv`` is the store (default: the connected Ray cluster's).

    Example:
        >>> class DictKV(dict):
        ...     def put(self, key, value): self[key] = value
        ...     def delete(self, key): self.pop(key, None)
        >>> kv = DictKV()
        >>> driver = ProgressChannel(kv=kv)
        >>> rank0 = ProgressChannel(driver.id, kv=kv)
        >>> rank0.send([{"event": "log", "step": 10, "train/loss": 0.5}])
        >>> rank0.send([{"event": "log", "step": 20, "train/loss": 0.25}])
        >>> [e["step"] for e in driver.receive()]
        [10, 20]
        >>> driver.receive()  # each event arrives once
        []
    """

    def __init__(self, channel_id: str | None = None, kv: KV | None = None) -> None:
        self.id = channel_id or uuid.uuid4().hex
        self._kv: KV = kv if kv is not None else RayKV()
        self._next_send = 0  # rank 0: the number of its next batch
        self._next_receive = 0  # driver: the number of the next batch to read
        self._beats = 0
        self._receiving = threading.Lock()  # the driver's pump, then its final drain
        self._last_beat: bytes | None = None  # worker: the heartbeat value seen last ...
        self._last_change: float | None = None  # ... and when it changed (time.monotonic())

    def __getstate__(self) -> dict[str, Any]:
        return {"id": self.id}  # a worker's copy starts its own counters, and its own store

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["id"])  # type: ignore[misc]

    def _key(self, name: str | int) -> str:
        return f"{self.id}/{name}"

    # -- rank 0 -----------------------------------------------------------------------------

    def send(self, events: list[Event]) -> None:
        """Write ``events`` as the next batch (one store round trip).

        Raises:
            Exception: Whatever the store raises (the caller, forge.progress_sender, keeps
                training going).
        """
        self._kv.put(self._key(self._next_send), dumps(events))
        self._next_send += 1

    def driver_alive(self, timeout_s: float = DRIVER_TIMEOUT_S) -> bool:
        """False once the driver's heartbeat has not changed for ``timeout_s`` (worker side).

        True when unsure (the store did not answer): a false "dead" would end a healthy run,
        and the run lock's own heartbeat is checked as well (forge.checkpoint.lock). A missing
        heartbeat counts as one more value that must change in time, not as death at once.
        """
        try:
            beat = self._kv.get(self._key("alive"))
        except Exception:
            return True
        now = time.monotonic()
        if self._last_change is None or beat != self._last_beat:
            self._last_beat, self._last_change = beat, now
            return True
        return now - self._last_change < timeout_s

    # -- driver -----------------------------------------------------------------------------

    def beat(self) -> None:
        """Tell the workers the driver is alive (call every :data:`HEARTBEAT_S`)."""
        self._beats += 1
        self._kv.put(self._key("alive"), str(self._beats).encode())

    def receive(self) -> list[Event]:
        """The events sent since the last call, in order (driver side)."""
        events: list[Event] = []
        with self._receiving:
            while (data := self._kv.get(self._key(self._next_receive))) is not None:
                self._kv.delete(self._key(self._next_receive))
                self._next_receive += 1
                events.extend(json.loads(data))
        return events

    def close(self) -> None:
        """Remove the heartbeat (the events were deleted as they were read)."""
        self._kv.delete(self._key("alive"))


def dumps(events: list[Event]) -> bytes:
    """Events as JSON bytes: numpy and torch scalars become numbers, other objects strings.

    Non-finite floats stay as they are (``NaN`` and ``Infinity``, which :func:`json.loads`
    reads back): a diverged loss must reach the driver as NaN, not vanish.

    Example:
        >>> import numpy as np
        >>> dumps([{"loss": np.float32(0.5), "step": np.int64(3), "bad": float("nan")}])
        b'[{"loss": 0.5, "step": 3, "bad": NaN}]'
    """
    return json.dumps(events, default=_plain).encode()


def _plain(value: Any) -> Any:
    """A numpy/torch scalar as its Python number; anything else JSON can't hold as its str."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            plain = item()
        except (TypeError, ValueError, RuntimeError):  # an array of several values
            plain = None
        if isinstance(plain, (int, float, bool)):
            return plain
    return str(value)
