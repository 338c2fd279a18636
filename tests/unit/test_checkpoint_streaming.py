"""The checkpoint streamer without Ray: background uploads, back-pressure, the commit protocol
across ranks, outages (fail / defer), retention, and the loop's resume from object storage.

Ranks are threads here, joined by a tiny in-process stand-in for the all-reduce and gather
collectives. Object storage is a real moto S3 server on 127.0.0.1 (the ``s3`` marker), faults
come from a proxy in front of it (see tests/conftest.py).
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from forge.checkpoint import storage
from forge.checkpoint.retry import RetryPolicy
from forge.checkpoint.storage import MiB, StorageOptions
from forge.checkpoint.store import CheckpointStore, open_checkpoint, step_dir_name
from forge.checkpoint.streamer import CheckpointStreamer
from forge.config.compose import compose
from forge.config.specs import LaunchPlan
from forge.config.validate import to_run_spec
from forge.errors import CheckpointError
from forge.loop import WorkerContext, run_loop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def memory_store(**kwargs: Any) -> CheckpointStore:
    return CheckpointStore(f"memory://forge-stream-{uuid.uuid4().hex}/run", **kwargs)


def gated(gate: threading.Event, data: bytes = b"x" * 100):
    """A payload whose serialization waits for ``gate`` (an upload that takes a while)."""

    def produce() -> bytes:
        assert gate.wait(30), "gate never opened"
        return data

    return produce


class Group:
    """All-reduce (sum) and gather for ranks that are threads of this process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[Any] = [None] * size

    def all_reduce_sum(self, rank: int):
        def reduce(tensor: torch.Tensor) -> None:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            tensor.copy_(total)

        return reduce

    def gather(self, rank: int):
        def gather(obj: Any) -> list[Any] | None:
            self.slots[rank] = obj
            self.barrier.wait()
            out = list(self.slots) if rank == 0 else None
            self.barrier.wait()
            return out

        return gather


# --------------------------------------------------------------------------------------------
# one rank, memory://


def test_submit_returns_before_the_upload_and_commit_waits_for_it() -> None:
    store = memory_store()
    gate = threading.Event()
    with CheckpointStreamer(store) as streamer:
        started = time.perf_counter()
        assert streamer.submit(5, {"w.bin": gated(gate)}, strategy="t")
        assert time.perf_counter() - started < 1.0  # training goes on while it uploads
        assert streamer.poll() == [] and store.latest() is None  # nothing visible yet
        gate.set()
        last = streamer.finish()
    assert last is not None and last.step == 5
    assert store.latest().read("w.bin") == b"x" * 100
    assert json.loads(storage.read_bytes(storage.join(store.root, "latest.json")))["step"] == 5


def test_poll_commits_once_the_upload_landed() -> None:
    store = memory_store()
    committed: list[int] = []
    streamer = CheckpointStreamer(store, on_commit=lambda c: committed.append(c.step))
    streamer.submit(1, {"a": b"1"}, strategy="t")
    deadline = time.time() + 10
    while not committed and time.time() < deadline:
        streamer.poll()  # what the loop does at every step
        time.sleep(0.01)
    assert committed == [1] and streamer.last.step == 1
    streamer.close()


def test_back_pressure_waits_for_a_free_slot() -> None:
    store = memory_store()
    gate = threading.Event()
    streamer = CheckpointStreamer(store, max_in_flight=1)
    streamer.submit(1, {"a": gated(gate)}, strategy="t")
    second_done = threading.Event()

    def second() -> None:
        streamer.submit(2, {"a": b"2"}, strategy="t")
        second_done.set()

    t = threading.Thread(target=second)
    t.start()
    assert not second_done.wait(0.5)  # K=1 snapshot in memory: the next checkpoint waits
    gate.set()
    assert second_done.wait(10)
    t.join()
    assert streamer.finish().step == 2
    assert [c.step for c in store.committed()] == [1, 2]
    streamer.close()


def test_defer_mode_skips_a_checkpoint_instead_of_waiting(caplog) -> None:
    store = memory_store()
    gate = threading.Event()
    streamer = CheckpointStreamer(store, max_in_flight=1, on_outage="defer")
    assert streamer.submit(1, {"a": gated(gate)}, strategy="t")
    with caplog.at_level(logging.WARNING, logger="forge.checkpoint.streamer"):
        started = time.perf_counter()
        assert not streamer.submit(2, {"a": b"2"}, strategy="t")
        assert time.perf_counter() - started < 0.5
    assert "Skipping the checkpoint at step 2" in caplog.text
    gate.set()
    assert streamer.submit(3, {"a": b"3"}, strategy="t", final=True)  # never skipped
    assert streamer.finish().step == 3
    assert [c.step for c in store.committed()] == [1, 3]
    streamer.close()


def test_synchronous_mode_commits_before_submit_returns() -> None:
    store = memory_store()
    streamer = CheckpointStreamer(store, async_upload=False)
    streamer.submit(4, {"a": lambda: b"4"}, strategy="t")
    assert store.latest().step == 4 and streamer.last.step == 4
    streamer.close()


def test_a_failing_serializer_fails_the_run_clearly() -> None:
    store = memory_store()
    streamer = CheckpointStreamer(store)

    def broken() -> bytes:
        raise RuntimeError("cannot serialize this")

    streamer.submit(7, {"a": broken}, strategy="t")
    with pytest.raises(CheckpointError, match=r"step 7 was not saved.*cannot serialize this"):
        streamer.finish()
    assert store.committed() == []


def test_a_later_checkpoint_failing_does_not_cancel_an_earlier_one() -> None:
    """Each checkpoint's files are cancelled together when one of them fails, but no other
    checkpoint's: the error names the checkpoint that failed and why, never "Cancelled" (a CI
    run once reported step 10 as cancelled because step 15's failure cancelled it)."""
    store = memory_store()
    streamer = CheckpointStreamer(store, max_in_flight=2)
    gate = threading.Event()

    def broken() -> bytes:
        raise RuntimeError("cannot serialize step 15")

    streamer.submit(10, {"a": gated(gate), "b": gated(gate)}, strategy="t")
    streamer.submit(15, {"a": broken, "b": gated(gate)}, strategy="t")
    time.sleep(0.3)  # step 15 fails while step 10 is still uploading
    gate.set()
    with pytest.raises(CheckpointError, match=r"step 15 was not saved.*cannot serialize step 15"):
        streamer.finish()
    assert [c.step for c in store.committed()] == [10]


def test_the_snapshot_is_released_once_uploaded() -> None:
    import gc
    import weakref

    store = memory_store()
    streamer = CheckpointStreamer(store)
    snapshot = torch.ones(1000)
    ref = weakref.ref(snapshot)
    streamer.submit(1, {"t": lambda s=snapshot: s.numpy().tobytes()}, strategy="t")
    del snapshot
    streamer.finish()
    gc.collect()
    assert ref() is None  # bounded memory: nothing keeps a landed snapshot alive
    streamer.close()


def test_snapshots_reuse_host_buffers_without_mixing_checkpoints() -> None:
    from forge.checkpoint.serialize import bytes_to_tensors, tensors_to_bytes
    from forge.strategies import host_copy

    store = memory_store()
    weights = torch.zeros(256)
    ptrs = []
    with CheckpointStreamer(store, max_in_flight=1) as streamer:
        for step in (1, 2, 3):
            weights.fill_(step)
            with streamer.snapshot():
                state = host_copy({"w": weights})
            ptrs.append(state["w"].data_ptr())
            streamer.submit(step, {"m": lambda s=state: tensors_to_bytes(s)}, strategy="t")
            weights.fill_(-1)  # training goes on: the snapshot must not see this
            streamer.finish()
    assert ptrs[1] == ptrs[2]  # the third snapshot reused the second's buffer (a memcpy)
    for ckpt in store.committed():
        assert bytes_to_tensors(ckpt.read("m"))["w"].unique().tolist() == [float(ckpt.step)]


# --------------------------------------------------------------------------------------------
# two ranks


def run_ranks(fn, size: int = 2) -> list[Any]:
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_commit_waits_for_every_rank_and_merges_their_files() -> None:
    store = memory_store()
    group = Group(2)
    slow = threading.Event()
    seen_before_rank1_landed: list[Any] = []

    def rank_main(rank: int):
        streamer = CheckpointStreamer(
            store, rank=rank, world_size=2,
            all_reduce_sum=group.all_reduce_sum(rank), gather=group.gather(rank),
        )  # fmt: skip
        files = {f"rank{rank}.bin": gated(slow, b"r1") if rank else b"r0"}
        if rank == 0:
            files["model.bin"] = b"model"
        streamer.submit(10, files, strategy="ddp")
        for _ in range(5):  # steps go by while rank 1 is still uploading
            streamer.poll()
            if rank == 0:
                seen_before_rank1_landed.append(store.latest(verify=False))
        if rank == 1:
            slow.set()
        last = streamer.finish()
        streamer.close()
        return last

    last0, last1 = run_ranks(rank_main)
    assert seen_before_rank1_landed == [None] * 5  # never committed early
    assert last1 is None and last0.step == 10
    m = store.latest().manifest
    assert set(m.files) == {"rank0.bin", "rank1.bin", "model.bin"} and m.world_size == 2
    assert store.latest().read("rank1.bin") == b"r1"


def test_a_failure_on_one_rank_fails_every_rank() -> None:
    store = memory_store()
    group = Group(2)

    def broken() -> bytes:
        raise OSError("disk on fire")

    def rank_main(rank: int):
        streamer = CheckpointStreamer(
            store, rank=rank, world_size=2,
            all_reduce_sum=group.all_reduce_sum(rank), gather=group.gather(rank),
        )  # fmt: skip
        streamer.submit(3, {f"r{rank}": broken if rank == 1 else b"ok"}, strategy="ddp")
        try:
            streamer.finish()
        except CheckpointError as exc:
            return str(exc)
        return None

    msg0, msg1 = run_ranks(rank_main)
    assert "rank 1: OSError: disk on fire" in msg0 and "step 3 was not saved" in msg0
    assert msg1 and "disk on fire" in msg1
    assert store.committed() == []


# --------------------------------------------------------------------------------------------
# object storage: outages, retention


def s3_store(endpoint: str, bucket: str, retry: RetryPolicy | None = None, **kwargs: Any):
    options = StorageOptions(
        endpoint_url=endpoint,
        part_size=5 * MiB,
        retry=retry or RetryPolicy(max_attempts=6, max_wait_s=3, initial_backoff_s=0.05),
    )
    return CheckpointStore(f"{bucket}/runs/r", options=options, **kwargs)


def mpu_count(s3_client, bucket: str) -> int:
    return len(s3_client.list_multipart_uploads(Bucket=bucket[5:]).get("Uploads", []))


@pytest.mark.s3
def test_outage_fails_clearly_and_keeps_committed_checkpoints(s3_proxy, s3_bucket, s3_client):
    store = s3_store(s3_proxy.endpoint, s3_bucket)
    streamer = CheckpointStreamer(store)
    streamer.submit(10, {"model.bin": os.urandom(6 * MiB)}, strategy="t")
    assert streamer.finish().step == 10
    s3_proxy.kill_at_part(s3_proxy.parts + 2)  # dies mid-upload of the next one, stays dead
    streamer.submit(20, {"model.bin": os.urandom(16 * MiB)}, strategy="t")
    started = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        streamer.finish()
    assert time.monotonic() - started < 30
    msg = str(info.value)
    assert "step 20 was not saved" in msg and "storage.on_outage=defer" in msg
    assert "storage.retry.max_wait_s=3" in msg and "resume=auto" in msg
    s3_proxy.revive()
    assert [c.step for c in store.committed()] == [10]  # no visible partial checkpoint
    assert store.latest().step == 10  # the committed one is intact
    # The restarted run's rank 0 clears what the dead upload left (abort could not reach it).
    store.clean_uncommitted()
    assert mpu_count(s3_client, s3_bucket) == 0
    assert not storage.exists(store.step_uri(20), store.options)


@pytest.mark.s3
def test_defer_mode_trains_through_an_outage_and_uploads_later(s3_proxy, s3_bucket, s3_client):
    store = s3_store(s3_proxy.endpoint, s3_bucket)
    s3_proxy.kill_at_part(2)  # dies mid-upload of the first checkpoint
    streamer = CheckpointStreamer(store, on_outage="defer", outage_max_s=120, max_in_flight=1)
    streamer.submit(10, {"model.bin": os.urandom(16 * MiB)}, strategy="t")
    deadline = time.time() + 30
    while s3_proxy.alive and time.time() < deadline:
        time.sleep(0.05)
    assert not s3_proxy.alive
    skipped = 0
    for _ in range(20):  # "training" goes on; the next checkpoints find the slot taken
        streamer.poll()
        skipped += not streamer.submit(11, {"model.bin": b"tiny"}, strategy="t")
    assert skipped == 20
    s3_proxy.revive()
    assert streamer.finish().step == 10
    assert [c.step for c in store.committed()] == [10]
    store.latest().verify()
    assert mpu_count(s3_client, s3_bucket) == 0
    streamer.close()


@pytest.mark.s3
def test_throttling_is_retried_and_the_checkpoint_commits(s3_proxy, s3_bucket):
    s3_proxy.fail_every = 4
    store = s3_store(s3_proxy.endpoint, s3_bucket)
    with CheckpointStreamer(store) as streamer:
        streamer.submit(1, {"a": os.urandom(11 * MiB), "b": b"b"}, strategy="t")
        assert streamer.finish().step == 1
    store.latest().verify()
    assert s3_proxy.injected > 0


@pytest.mark.s3
def test_retention_keep_last_on_s3(s3_server, s3_bucket) -> None:
    store = s3_store(s3_server, s3_bucket, keep_last=2)
    with CheckpointStreamer(store) as streamer:
        for step in range(1, 6):
            streamer.submit(step, {"m": f"{step}".encode()}, strategy="t")
            streamer.poll()
        streamer.finish()
    assert [c.step for c in store.committed()] == [4, 5]
    assert json.loads(storage.read_bytes(f"{store.root}/latest.json", store.options))["step"] == 5


@pytest.mark.s3
def test_retention_top_k_by_metric_on_s3(s3_server, s3_bucket) -> None:
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.9, 5: 0.2, 6: 0.35}
    store = s3_store(s3_server, s3_bucket, keep_last=1, monitor="val/loss", keep_best=2)
    with CheckpointStreamer(store) as streamer:
        for step, loss in losses.items():
            streamer.submit(step, {"m": b"w"}, strategy="t", metrics={"val/loss": loss})
        streamer.finish()
    # the best two (steps 2 and 5) and the newest (6), which is never deleted
    assert [c.step for c in store.committed()] == [2, 5, 6]
    assert [c.step for c in store.top(2)] == [2, 5]


# --------------------------------------------------------------------------------------------
# the loop, on object storage


def s3_spec(endpoint: str, bucket: str, *overrides: str):
    return to_run_spec(
        compose(
            [
                "experiment=digits",
                f"storage.uri={bucket}/runs",
                f"storage.endpoint_url={endpoint}",
                "trainer.max_steps=20",
                "trainer.log_every_n_steps=5",
                "trainer.val_every_n_steps=0",
                "checkpoint.every_n_steps=5",
                "checkpoint.keep_last=null",
                "data.batch_size=32",
                "recipe.params.channels=4",
                *overrides,
            ]
        )
    )


def plan(run_uri: str) -> LaunchPlan:
    return LaunchPlan(run_uri=run_uri, config_hash="h", git_sha="abc", launch_time=time.time())


@pytest.mark.s3
def test_loop_checkpoints_to_s3_and_resumes_with_nothing_local(s3_server, s3_bucket) -> None:
    run_uri = f"{s3_bucket}/runs/exp"
    first = run_loop(
        s3_spec(s3_server, s3_bucket, "trainer.max_steps=10"), plan(run_uri), WorkerContext()
    )
    assert first["last_checkpoint"] == f"{run_uri}/checkpoints/{step_dir_name(10)}"
    options = StorageOptions(endpoint_url=s3_server)
    m = open_checkpoint(first["last_checkpoint"], options=options).manifest
    assert (m.step, m.world_size, m.strategy, m.config_hash, m.git_sha) == (
        10,
        1,
        "ddp",
        "h",
        "abc",
    )
    assert all(len(e.sha256) == 64 for e in m.files.values())
    events: list[dict[str, Any]] = []
    second = run_loop(  # a new process would find exactly this: no local state at all
        s3_spec(s3_server, s3_bucket), plan(run_uri), WorkerContext(on_progress=events.append)
    )
    assert second["step"] == 20
    assert [e["step"] for e in events if e["event"] == "resumed"] == [10]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [15, 20]
    rows = storage.read_bytes(f"{run_uri}/metrics.jsonl", options).decode().splitlines()
    steps = [json.loads(r)["step"] for r in rows if "train/loss" in r]
    assert steps == [5, 10, 15, 20]  # one metrics file, continued across the two runs
    tb = storage.list_dir(f"{run_uri}/tensorboard", options)
    assert len(tb) == 2  # one event file per run, both uploaded


@pytest.mark.s3
def test_loop_skips_a_truncated_checkpoint_on_s3(s3_server, s3_bucket, caplog) -> None:
    run_uri = f"{s3_bucket}/runs/trunc"
    options = StorageOptions(endpoint_url=s3_server)
    run_loop(s3_spec(s3_server, s3_bucket, "trainer.max_steps=10"), plan(run_uri), WorkerContext())
    shard = f"{run_uri}/checkpoints/{step_dir_name(10)}/model.safetensors"
    storage.write_bytes(shard, storage.read_bytes(shard, options)[:1000], options)
    events: list[dict[str, Any]] = []
    with caplog.at_level(logging.WARNING):
        out = run_loop(
            s3_spec(s3_server, s3_bucket), plan(run_uri), WorkerContext(on_progress=events.append)
        )
    assert f"Skipping checkpoint {run_uri}/checkpoints/{step_dir_name(10)}" in caplog.text
    assert "truncated" in caplog.text
    assert [e["step"] for e in events if e["event"] == "resumed"] == [5]  # the one before
    assert out["step"] == 20
    # The bad step 10 lost its commit before the run wrote step 10 again, then got a new one.
    assert f"Uncommitted {run_uri}/checkpoints/{step_dir_name(10)}" in caplog.text
    open_checkpoint(f"{run_uri}/checkpoints/{step_dir_name(10)}", options=options).verify()


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.s3
def test_loop_rejects_a_malicious_pickle_on_s3(s3_server, s3_bucket, tmp_path, caplog) -> None:
    """A committed checkpoint whose optim.pt carries code (manifest and all): the code never
    runs, the checkpoint is skipped with a warning, and the one before it is used."""
    run_uri = f"{s3_bucket}/runs/evil"
    options = StorageOptions(endpoint_url=s3_server)
    run_loop(s3_spec(s3_server, s3_bucket, "trainer.max_steps=10"), plan(run_uri), WorkerContext())
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save({"state": {0: _Touch(marker)}, "param_groups": []}, evil)
    store = CheckpointStore(run_uri, options=options)
    newest = store.latest()
    files = {n: newest.read(n) for n in newest.manifest.files}
    files["optim.pt"] = evil.getvalue()
    store.save(12, files, strategy="ddp", state={**newest.manifest.state, "step": 12})
    events: list[dict[str, Any]] = []
    with caplog.at_level(logging.WARNING):
        out = run_loop(
            s3_spec(s3_server, s3_bucket), plan(run_uri), WorkerContext(on_progress=events.append)
        )
    assert not marker.exists(), "unpickling ran the payload"
    assert f"Skipping checkpoint {run_uri}/checkpoints/{step_dir_name(12)}" in caplog.text
    assert "refused to load" in caplog.text
    assert [e["step"] for e in events if e["event"] == "resumed"] == [10]
    assert out["step"] == 20


@pytest.mark.s3
def test_defer_mode_gives_up_after_outage_max_s(s3_proxy, s3_bucket) -> None:
    """storage.outage_max_s bounds how long deferred uploads keep retrying: with the endpoint
    dead, the checkpoint fails after ~2 s (not at the first error, not after the 3 s retry
    budget of fail mode, not after an hour), and the message names storage.outage_max_s."""
    store = s3_store(s3_proxy.endpoint, s3_bucket)
    s3_proxy.kill()
    streamer = CheckpointStreamer(store, on_outage="defer", outage_max_s=2, max_in_flight=1)
    started = time.monotonic()
    streamer.submit(10, {"model.bin": b"w" * 1024}, strategy="t")
    with pytest.raises(CheckpointError) as info:
        streamer.finish()
    elapsed = time.monotonic() - started
    streamer.close(cancel=True)
    s3_proxy.revive()
    # Jittered backoff never sleeps past the budget, so it may stop a little before 2 s.
    assert elapsed < 12, elapsed  # a 10x budget (20 s) fails this
    assert "storage.outage_max_s=2" in str(info.value)
    attempts = int(str(info.value).split(" attempt(s)")[0].rsplit(" ", 1)[1])
    assert attempts >= 3  # kept retrying through the outage
    assert store.committed() == []


def test_the_loop_streamer_takes_outage_max_s_from_the_spec(tmp_path) -> None:
    from forge.config.specs import RunSpec
    from forge.loop import WorkerContext, make_streamer

    spec = RunSpec(
        recipe={"name": "d", "module": "recipes.digits"},
        storage={"uri": str(tmp_path), "on_outage": "defer", "outage_max_s": 7},
    )
    streamer = make_streamer(spec, CheckpointStore(str(tmp_path)), WorkerContext(), print, None)
    assert streamer.store.options.retry.max_wait_s == 7
    assert streamer.store.options.retry.budget_key == "storage.outage_max_s"
    streamer.close()
