"""forge.progress_channel: rank 0's events reach the driver once, in order, as plain JSON; a
worker takes the driver for dead only after its heartbeat stood still for the whole timeout."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from forge import progress_channel
from forge.progress_channel import ProgressChannel


class DictKV(dict):
    """The store as a dict; ``fail`` makes every call raise (an unreachable GCS)."""

    fail = False

    def get(self, key: str) -> bytes | None:  # type: ignore[override]
        if self.fail:
            raise ConnectionError("GCS unreachable")
        return super().get(key)

    def put(self, key: str, value: bytes) -> None:
        if self.fail:
            raise ConnectionError("GCS unreachable")
        self[key] = value

    def delete(self, key: str) -> None:
        self.pop(key, None)


@pytest.fixture
def kv() -> DictKV:
    return DictKV()


def test_events_arrive_once_in_order_and_nothing_stays_behind(kv) -> None:
    driver = ProgressChannel(kv=kv)
    rank0 = ProgressChannel(driver.id, kv=kv)
    driver.beat()
    rank0.send([{"event": "start", "step": 0}])
    rank0.send([{"event": "log", "step": 10}, {"event": "log", "step": 20}])
    assert [e["step"] for e in driver.receive()] == [0, 10, 20]
    rank0.send([{"event": "summary", "step": 30}])
    assert driver.receive() == [{"event": "summary", "step": 30}]
    assert driver.receive() == []
    driver.close()
    assert kv == {}  # read batches and the heartbeat are gone


def test_a_worker_copy_carries_only_the_channel_id(kv) -> None:
    driver = ProgressChannel(kv=kv)
    driver.beat()
    assert driver.__getstate__() == {"id": driver.id}
    copy = pickle.loads(pickle.dumps(driver))
    assert copy.id == driver.id
    assert isinstance(copy._kv, progress_channel.RayKV)  # the worker's own cluster store


def test_values_travel_as_plain_json(kv) -> None:
    driver = ProgressChannel(kv=kv)
    ProgressChannel(driver.id, kv=kv).send(
        [
            {
                "loss": np.float32(0.5),
                "step": np.int64(7),
                "acc": torch.tensor(0.25),
                "diverged": float("nan"),
                "uri": Path("/runs/a"),
            }
        ]
    )
    (event,) = driver.receive()
    assert event["loss"] == 0.5 and event["step"] == 7 and event["acc"] == 0.25
    assert type(event["step"]) is int and math.isnan(event["diverged"])
    assert event["uri"] == "/runs/a"


def test_driver_is_dead_only_after_its_heartbeat_stood_still_for_the_timeout(
    kv, monkeypatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(progress_channel.time, "monotonic", lambda: now[0])
    driver = ProgressChannel(kv=kv)
    worker = ProgressChannel(driver.id, kv=kv)
    driver.beat()
    assert worker.driver_alive(timeout_s=60)
    now[0] += 50
    driver.beat()  # the heartbeat moved: the clock starts again
    assert worker.driver_alive(timeout_s=60)
    now[0] += 59
    assert worker.driver_alive(timeout_s=60)
    now[0] += 2  # 61 s without a beat
    assert not worker.driver_alive(timeout_s=60)


def test_an_unreachable_store_never_reads_as_a_dead_driver(kv, monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(progress_channel.time, "monotonic", lambda: now[0])
    worker = ProgressChannel("run", kv=kv)
    kv.fail = True
    for _ in range(3):
        now[0] += 1000
        assert worker.driver_alive(timeout_s=60)


def test_a_heartbeat_that_never_appears_times_out_as_well(kv, monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(progress_channel.time, "monotonic", lambda: now[0])
    worker = ProgressChannel("gone", kv=kv)  # the driver died before (or after) its first beat
    assert worker.driver_alive(timeout_s=60)
    now[0] += 61
    assert not worker.driver_alive(timeout_s=60)


def test_the_drivers_threads_outlive_store_hiccups_and_callback_errors(monkeypatch) -> None:
    """A failed receive or beat is retried: a pump or heartbeat that gave up on the first
    error would leave workers to take a healthy driver for dead two minutes later."""
    import threading
    import time

    from forge import launch

    monkeypatch.setattr(launch, "_POLL_S", 0.01)
    monkeypatch.setattr(progress_channel, "HEARTBEAT_S", 0.01)

    class FlakyChannel:
        def __init__(self) -> None:
            self.receives = self.beat_calls = self.beats = 0

        def receive(self) -> list[dict]:
            self.receives += 1
            if self.receives == 1:
                raise ConnectionError("GCS hiccup")
            return [{"event": "log", "step": self.receives}]

        def beat(self) -> None:
            self.beat_calls += 1
            if self.beat_calls == 1:
                raise ConnectionError("GCS hiccup")
            self.beats += 1

    got: list[int] = []

    def handle(events: list[dict]) -> None:
        if events[0]["step"] == 2:
            raise RuntimeError("a bug in an on_progress callback")
        got.extend(e["step"] for e in events)

    channel, stop = FlakyChannel(), threading.Event()
    threads = [
        threading.Thread(target=launch._pump, args=(channel, handle, stop)),
        threading.Thread(target=launch._heartbeat, args=(channel, stop)),
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while (len(got) < 3 or channel.beats < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join()
    assert got[:3] == [3, 4, 5]
    assert channel.beats >= 2
