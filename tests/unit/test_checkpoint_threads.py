"""The checkpoint subsystem's threads run below the training threads' CPU priority."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from forge.checkpoint import storage
from forge.checkpoint.store import CheckpointStore
from forge.checkpoint.streamer import CheckpointStreamer
from forge.checkpoint.threads import BACKGROUND_NICE, LOWEST_NICE, background_niceness

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice")


def this_thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_a_streamed_checkpoint_is_written_by_threads_at_background_niceness(tmp_path) -> None:
    process_nice = os.getpriority(os.PRIO_PROCESS, os.getpid())
    if process_nice >= LOWEST_NICE:
        pytest.skip("this process already runs at the lowest priority")
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
    assert seen == [background_niceness(process_nice)]
    assert this_thread_nice() == process_nice  # the caller's thread keeps its priority


def test_in_a_ray_worker_the_threads_still_run_below_training(tmp_path) -> None:
    """Ray starts its workers at niceness 15 (RAY_worker_niceness). A fixed background
    niceness of 10 left the checkpoint threads level with training there; they go to 19."""
    if os.getpriority(os.PRIO_PROCESS, os.getpid()) > 15:
        pytest.skip("this process runs below a Ray worker's priority already")
    worker = textwrap.dedent(
        """
        import os, sys, threading
        os.nice(15 - os.nice(0))  # where Ray puts its workers
        from forge.checkpoint.store import CheckpointStore
        from forge.checkpoint.streamer import CheckpointStreamer

        def nice():
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        seen = []

        def payload():
            seen.append(nice())
            return b"weights"

        with CheckpointStreamer(CheckpointStore(sys.argv[1])) as streamer:
            streamer.submit(1, {"model.safetensors": payload}, strategy="ddp")
            streamer.finish()
        print(seen[0], nice())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", worker, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(min(LOWEST_NICE, 15 + BACKGROUND_NICE)), "15"]
