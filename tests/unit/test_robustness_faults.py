"""Issue 9, the fault side, without Ray: the run lock (live holders, fencing commits, a dead
driver's workers), which failures are restarted, a storage outage through the fault-injecting
S3 proxy, and how the embedded Ray is started.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import pytest

from forge.checkpoint import storage
from forge.checkpoint.lock import LOCK_NAME, LockLostError, RunLock, commit_fence
from forge.checkpoint.retry import RetryPolicy
from forge.checkpoint.storage import MiB, StorageOptions
from forge.checkpoint.store import CheckpointStore
from forge.checkpoint.streamer import CheckpointStreamer
from forge.config.specs import RaySpec
from forge.errors import CheckpointError, ClusterError, ConfigError, TrainingError
from forge.launch import is_restartable, run_with_restarts, unwrap_failure


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid now names no process (pids are not reused this fast)
    return proc.pid


def write_lock(run: str, **info) -> None:
    base = {"token": "other", "host": platform.node(), "pid": os.getpid(), "heartbeat_at": 0}
    storage.write_bytes(f"{run}/{LOCK_NAME}", json.dumps({**base, **info}).encode())


# --------------------------------------------------------------------------------------------
# 3. the run lock


def test_a_holder_alive_on_this_host_is_never_taken_over(tmp_path) -> None:
    """The bug: resume=auto with a short stale timeout took over a live run."""
    run = str(tmp_path / "run")
    write_lock(run, heartbeat_at=time.time() - 3600)  # stale by any timeout, but alive here
    for kwargs in ({"take_over_stale": True, "stale_after_s": 1}, {"break_lock": True}):
        with pytest.raises(ConfigError, match=f"alive on this host.*kill {os.getpid()}"):
            RunLock.acquire(run, heartbeat_s=None, **kwargs)


def test_a_reused_pid_does_not_keep_a_dead_lock(tmp_path, caplog) -> None:
    run = str(tmp_path / "run")
    write_lock(run, pid=os.getpid(), pid_started="1", heartbeat_at=time.time())
    RunLock.acquire(run, heartbeat_s=None).release()  # that pid is another process now


def test_commit_is_fenced_on_the_lock(tmp_path) -> None:
    """A run whose lock was taken over commits nothing more: no manifest, no pointer move."""
    run = str(tmp_path / "run")
    lock = RunLock.acquire(run, heartbeat_s=None)
    store = CheckpointStore(run, fence=commit_fence(run, lock.info["token"]))
    store.save(10, {"w.bin": b"a"}, strategy="ddp")
    write_lock(run, token="the-new-run", host="another-host", heartbeat_at=time.time())
    with pytest.raises(LockLostError, match="no longer holds the lock.*another-host"):
        store.save(20, {"w.bin": b"b"}, strategy="ddp")
    assert [c.step for c in CheckpointStore(run).committed()] == [10]
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 10
    with pytest.raises(LockLostError):
        store.clean_uncommitted()  # the other run's uploads in flight are not leftovers


def test_streamed_commit_stops_with_the_lock_lost_message(tmp_path) -> None:
    run = str(tmp_path / "run")
    lock = RunLock.acquire(run, heartbeat_s=None)
    store = CheckpointStore(run, fence=commit_fence(run, lock.info["token"]))
    streamer = CheckpointStreamer(store)
    lock.release()  # e.g. deleted by break_lock elsewhere
    streamer.submit(30, {"w.bin": lambda: b"w"}, strategy="ddp")
    with pytest.raises(LockLostError) as info:
        streamer.finish()
    assert "storage is back" not in str(info.value)
    assert CheckpointStore(run).committed() == []


@pytest.mark.parametrize(
    ("holder", "driver_alive", "refused"),
    [
        ({"pid": "dead"}, None, True),  # the driver on this host was SIGKILLed
        ({}, lambda: False, True),  # Ray says the driver's actor is gone
        ({"host": "elsewhere", "heartbeat_at": "old"}, None, True),  # no heartbeat for long
        ({"host": "elsewhere", "heartbeat_at": "now"}, None, False),
        ({}, lambda: True, False),
    ],
)
def test_workers_of_a_dead_driver_do_not_commit(tmp_path, holder, driver_alive, refused) -> None:
    run = str(tmp_path / "run")
    info = dict(holder)
    if info.get("pid") == "dead":
        info["pid"] = dead_pid()
    if "heartbeat_at" in info:
        info["heartbeat_at"] = time.time() - (1000 if info["heartbeat_at"] == "old" else 0)
    else:
        info["heartbeat_at"] = time.time()
    write_lock(run, token="ours", **info)
    fence = commit_fence(run, "ours", stale_after_s=300, driver_alive=driver_alive)
    store = CheckpointStore(run, fence=fence)
    if refused:
        with pytest.raises(LockLostError, match="driver of this run .* is gone"):
            store.save(10, {"w.bin": b"a"}, strategy="ddp")
        assert CheckpointStore(run).committed() == []
    else:
        assert store.save(10, {"w.bin": b"a"}, strategy="ddp").step == 10


# --------------------------------------------------------------------------------------------
# 4. only failures a restart can fix are retried


def worker_group_error(**failures: BaseException) -> BaseException:
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("workers failed", {int(k[1:]): v for k, v in failures.items()})


def lost_worker() -> BaseException:
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    return worker_group_error(
        r0=RuntimeError("[gloo] Connection closed by peer"),
        r1=WorkerHealthCheckFailedError("worker 1 died", ActorDiedError()),
    )


def recipe_error() -> BaseException:
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    cause = ValueError("channels must be > 0")
    return worker_group_error(r0=UserExceptionWithTraceback(cause, "Traceback ..."))


class Attempts:
    def __init__(self, *outcomes) -> None:
        self.outcomes, self.calls = list(outcomes), 0

    def __call__(self):
        self.calls += 1
        outcome = self.outcomes[min(self.calls, len(self.outcomes)) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.mark.parametrize(
    "failure",
    [
        ConfigError("data.batch_size: too large"),
        CheckpointError("The checkpoint at step 30 was not saved"),
        LockLostError("This run no longer holds the lock"),
    ],
)
def test_forge_errors_end_the_run_at_once_with_their_message(failure) -> None:
    attempt = Attempts(worker_group_error(r0=failure, r1=RuntimeError("gloo: peer gone")))
    with pytest.raises(type(failure)) as info:
        run_with_restarts(attempt, max_failures=2)
    assert attempt.calls == 1 and info.value is failure


def test_recipe_errors_are_not_retried() -> None:
    attempt = Attempts(recipe_error())
    with pytest.raises(TrainingError, match="ValueError: channels must be > 0"):
        run_with_restarts(attempt, max_failures=2)
    assert attempt.calls == 1


def test_a_hang_is_waited_out_once() -> None:
    """A hung worker times out Ray's health check; a restart would hang (and wait) again."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckTimeoutError

    attempt = Attempts(worker_group_error(r0=WorkerHealthCheckTimeoutError("hung")))
    with pytest.raises(TrainingError):
        run_with_restarts(attempt, max_failures=5)
    assert attempt.calls == 1


def test_a_lost_worker_is_restarted() -> None:
    restarts = []
    attempt = Attempts(lost_worker(), {"step": 30})
    assert is_restartable(lost_worker()) and not is_restartable(recipe_error())
    assert run_with_restarts(attempt, 2, lambda n, e: restarts.append(n)) == {"step": 30}
    assert attempt.calls == 2 and restarts == [1]


def test_gives_up_after_max_failures_with_a_clear_message() -> None:
    attempt = Attempts(lost_worker())
    with pytest.raises(TrainingError) as info:
        run_with_restarts(attempt, max_failures=2)
    assert attempt.calls == 3
    msg = str(info.value)
    assert "gave up after 2 restart(s) (trainer.max_failures=2)" in msg
    assert "resume=auto" in msg and "Connection closed by peer" not in msg.split(";")[0]


def test_unlimited_restarts() -> None:
    attempt = Attempts(*[lost_worker()] * 5, "done")
    assert run_with_restarts(attempt, max_failures=-1) == "done" and attempt.calls == 6


def test_forge_error_wins_over_a_peers_connection_error() -> None:
    exc = worker_group_error(r0=RuntimeError("gloo"), r1=ConfigError("the real one"))
    assert str(unwrap_failure(exc)) == "the real one"


@pytest.mark.s3
def test_storage_outage_with_on_outage_fail_ends_the_run_with_the_first_message(
    s3_proxy, s3_bucket
) -> None:
    """Through the fault-injecting proxy: the endpoint dies while step 30 uploads. The run ends
    after that one attempt, with the documented message, not a later attempt's."""
    options = StorageOptions(
        endpoint_url=s3_proxy.endpoint,
        retry=RetryPolicy(max_attempts=3, max_wait_s=2, initial_backoff_s=0.01, max_backoff_s=0.1),
        part_size=5 * MiB,
    )
    store = CheckpointStore(f"{s3_bucket}/runs/exp", options=options)

    def attempt():
        with CheckpointStreamer(store, on_outage="fail") as streamer:
            streamer.submit(20, {"w.bin": lambda: b"ok"}, strategy="ddp")
            streamer.finish()
            s3_proxy.kill()
            streamer.submit(30, {"w.bin": lambda: b"x" * (6 * MiB)}, strategy="ddp")
            streamer.finish()

    calls = []

    def counted():
        calls.append(1)
        attempt()

    with pytest.raises(CheckpointError) as info:
        run_with_restarts(counted, max_failures=2)
    assert len(calls) == 1
    msg = str(info.value)
    assert msg.startswith("The checkpoint at step 30 was not saved")
    assert "committed before it are intact: resume with resume=auto" in msg
    s3_proxy.revive()
    assert [c.step for c in store.committed()] == [20]


# --------------------------------------------------------------------------------------------
# 2. the embedded Ray (ray.init itself is replaced: these check what forge asks of it)


class _InitCalls(list):
    raise_: BaseException | None = None


@pytest.fixture()
def fake_ray_init(monkeypatch) -> _InitCalls:
    import ray

    calls = _InitCalls()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))

    def init(**kwargs):
        calls.append(kwargs)
        if calls.raise_ is not None:
            raise calls.raise_

    monkeypatch.setattr(ray, "init", init)
    return calls


def test_default_always_starts_its_own_local_ray(fake_ray_init, monkeypatch) -> None:
    from forge.cluster import ray_session

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # someone else's cluster
    with ray_session(RaySpec()):
        pass
    assert fake_ray_init[0]["address"] == "local" and fake_ray_init[-1] == "shutdown"


def test_auto_joins(fake_ray_init) -> None:
    from forge.cluster import ray_session

    with ray_session(RaySpec(address="auto")):
        pass
    assert fake_ray_init[0]["address"] == "auto" and "num_cpus" not in fake_ray_init[0]
    assert "shutdown" not in fake_ray_init  # not ours to stop


@pytest.mark.parametrize(
    ("address", "error", "words"),
    [
        (
            None,
            ValueError("When connecting to an existing cluster, num_cpus and num_gpus must not"),
            "could not start an embedded local Ray (ValueError: When connecting",
        ),
        (None, OSError("No space left on device"), "ray.address=null"),
        (
            "auto",
            ConnectionError("Could not find any running Ray instance. Please specify ..."),
            "no running Ray cluster was found on this machine",
        ),
        ("auto", RuntimeError("version mismatch\nmore lines"), "version mismatch)"),
    ],
)
def test_every_ray_init_failure_is_one_paragraph(fake_ray_init, address, error, words) -> None:
    from forge.cluster import ray_session

    fake_ray_init.raise_ = error
    with pytest.raises(ClusterError) as info:
        with ray_session(RaySpec(address=address)):
            pass
    msg = str(info.value)
    assert words in msg and "\n" not in msg
    assert "ray start --head" in msg or "ray.address=auto" in msg
