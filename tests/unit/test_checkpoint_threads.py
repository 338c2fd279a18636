"""The checkpoint subsystem's threads run below the training threads' CPU priority."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from forge.checkpoint import storage
from forge.checkpoint.store import CheckpointStore
from forge.checkpoint.streamer import CheckpointStreamer
from forge.checkpoint.threads import BACKGROUND_NICE

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice")


def this_thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_a_streamed_checkpoint_is_written_by_threads_at_background_niceness(tmp_path) -> None:
    if os.getpriority(os.PRIO_PROCESS, 0) >= BACKGROUND_NICE:
        pytest.skip("this process already runs at the background niceness")
    seen: list[int] = []

    def payload() -> bytes:  # serialized on the streamer's thread, as the loop's callables are
        seen.append(this_thread_nice())
        return b"weights"

    store = CheckpointStore(str(tmp_path / "run"))
    with CheckpointStreamer(store) as streamer:
        streamer.submit(1, {"model.safetensors": payload}, strategy="ddp")
        committed = streamer.finish()
    assert committed is not None and committed.step == 1
    assert storage.read_bytes(f"{committed.uri}/model.safetensors") == b"weights"
    assert seen == [BACKGROUND_NICE]
    assert this_thread_nice() < BACKGROUND_NICE  # the caller's thread keeps its priority
