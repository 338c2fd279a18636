"""forge.checkpoint.storage against a real S3-compatible HTTP server (moto's, on 127.0.0.1):
multipart uploads and ranged downloads, the one retry loop, outages, the run lock, the probe.

Faults are real too: a proxy in front of the server answers ``503 SlowDown`` or dies (resets
open connections, refuses new ones) while the server behind it keeps its state.
"""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

from forge.checkpoint import storage
from forge.checkpoint.lock import LOCK_NAME, RunLock
from forge.checkpoint.retry import RetryPolicy, StorageUnavailableError, is_transient
from forge.checkpoint.storage import MiB, StorageOptions
from forge.errors import ConfigError

pytestmark = pytest.mark.s3

FAST_RETRY = RetryPolicy(max_attempts=8, max_wait_s=20, initial_backoff_s=0.01, max_backoff_s=0.1)


def opts(endpoint: str, **kwargs) -> StorageOptions:
    return StorageOptions(
        endpoint_url=endpoint,
        retry=kwargs.pop("retry", FAST_RETRY),
        part_size=kwargs.pop("part_size", 5 * MiB),
        **kwargs,
    )


def uploads(s3_client, uri: str) -> list[dict]:
    bucket, key = storage.split_s3(uri)
    return s3_client.list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])


# --------------------------------------------------------------------------------------------
# the basics


def test_small_and_multipart_objects_round_trip(s3_server, s3_bucket, s3_client) -> None:
    o = opts(s3_server)
    small = os.urandom(1000)
    big = os.urandom(13 * MiB + 7)  # 3 parts of 5 MiB, the last one short
    storage.write_bytes(f"{s3_bucket}/run/small.bin", small, o)
    storage.write_bytes(f"{s3_bucket}/run/big.bin", big, o)
    assert storage.read_bytes(f"{s3_bucket}/run/small.bin", o) == small
    assert storage.read_bytes(f"{s3_bucket}/run/big.bin", o) == big  # 3 ranged GETs
    head = s3_client.head_object(Bucket=s3_bucket[5:], Key="run/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # it really was a 3-part upload
    names = {e["name"]: e for e in storage.list_dir(f"{s3_bucket}/run", o)}
    assert names["big.bin"]["size"] == len(big) and names["small.bin"]["type"] == "file"
    assert storage.exists(f"{s3_bucket}/run/big.bin", o)
    storage.remove(f"{s3_bucket}/run", o)
    assert not storage.exists(f"{s3_bucket}/run/big.bin", o)
    assert storage.list_dir(f"{s3_bucket}/run", o) == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3_bucket}/run/big.bin", o)


def test_memoryviews_upload_with_the_crc32_botocore_would_send(
    s3_server, s3_bucket, s3_client
) -> None:
    """The serializers return memoryviews; parts go up as views of them, with forge's CRC32."""
    from botocore.httpchecksum import Crc32Checksum

    from forge.checkpoint import s3

    o = opts(s3_server)
    big = memoryview(bytearray(os.urandom(11 * MiB + 3)))
    small = memoryview(bytearray(os.urandom(1000)))
    storage.write_bytes(f"{s3_bucket}/run/big.bin", big, o)
    storage.write_bytes(f"{s3_bucket}/run/small.bin", small, o)
    assert storage.read_bytes(f"{s3_bucket}/run/big.bin", o) == bytes(big)
    assert storage.read_bytes(f"{s3_bucket}/run/small.bin", o) == bytes(small)
    head = s3_client.head_object(Bucket=s3_bucket[5:], Key="run/small.bin", ChecksumMode="ENABLED")
    botocore_crc = Crc32Checksum()
    botocore_crc.update(bytes(small))
    assert (
        head["ChecksumCRC32"] == botocore_crc.b64digest() == s3._body_args(small)["ChecksumCRC32"]
    )
    body = s3._body_args(big[5:])["Body"]
    chunk = body.read(4)
    assert chunk == bytes(big[5:9]) and body.seek(0, 2) == len(big) - 5
    # The body hands out views of the caller's buffer, not copies (each copy held the GIL).
    big[5] ^= 0xFF
    assert chunk[0] == big[5]
    assert body.read() == b"" and not body.read(10)


def test_endpoint_from_the_aws_environment(s3_server, s3_bucket, monkeypatch) -> None:
    # storage.endpoint_url=null: botocore's own AWS_ENDPOINT_URL applies (configs/storage/s3.yaml)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    o = StorageOptions(max_concurrency=3)  # a client of its own, built with the variable set
    storage.write_bytes(f"{s3_bucket}/env.txt", b"via env", o)
    assert storage.read_bytes(f"{s3_bucket}/env.txt", o) == b"via env"


# --------------------------------------------------------------------------------------------
# retries, in one place


def test_transient_classification() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
        )

    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("Whatever", 502))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    wrapped = OSError(5, "s3fs wraps it")
    wrapped.__cause__ = client_error("SlowDown", 503)
    assert is_transient(wrapped)
    assert not is_transient(client_error("NoSuchBucket", 404))
    assert not is_transient(client_error("AccessDenied", 403))
    assert not is_transient(FileNotFoundError())
    assert not is_transient(ValueError("a bug"))
    assert not is_transient(StorageUnavailableError("budget spent"))


@pytest.mark.parametrize(
    ("status", "code"), [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests")]
)
def test_injected_errors_are_retried(s3_proxy, s3_bucket, status, code) -> None:
    s3_proxy.fail_every, s3_proxy.fail_status, s3_proxy.fail_code = 3, status, code
    o = opts(s3_proxy.endpoint)
    data = os.urandom(12 * MiB)
    storage.write_bytes(f"{s3_bucket}/x/big.bin", data, o)
    storage.write_bytes(f"{s3_bucket}/x/small.bin", b"s", o)
    assert storage.read_bytes(f"{s3_bucket}/x/big.bin", o) == data
    assert [e["name"] for e in storage.list_dir(f"{s3_bucket}/x", o)] == ["big.bin", "small.bin"]
    assert s3_proxy.injected >= 3


def test_clients_do_not_retry_underneath(s3_proxy, s3_bucket) -> None:
    """botocore and s3fs are told not to retry: one policy attempt is one HTTP request."""
    s3_proxy.fail_every = 1  # every request fails
    o = opts(
        s3_proxy.endpoint, retry=RetryPolicy(max_attempts=3, max_wait_s=10, initial_backoff_s=0.01)
    )
    with pytest.raises(StorageUnavailableError, match=r"3 attempt\(s\).*SlowDown"):
        storage.write_bytes(f"{s3_bucket}/k", b"x", o)
    assert s3_proxy.requests == 3
    s3_proxy.requests = 0
    with pytest.raises(StorageUnavailableError):
        storage.list_dir(f"{s3_bucket}/", o)  # the s3fs path
    assert s3_proxy.requests == 3


def test_missing_objects_are_not_retried(s3_proxy, s3_bucket) -> None:
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3_bucket}/nothing-here", opts(s3_proxy.endpoint))
    assert s3_proxy.requests == 1


def test_outage_longer_than_the_budget_is_a_clear_error(s3_proxy, s3_bucket, s3_client) -> None:
    s3_proxy.kill_at_part(2)  # the endpoint dies mid-upload and stays dead
    o = opts(
        s3_proxy.endpoint,
        retry=RetryPolicy(max_attempts=None, max_wait_s=2, initial_backoff_s=0.05),
    )
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        storage.write_bytes(f"{s3_bucket}/run/ckpt/model.bin", os.urandom(16 * MiB), o)
    assert time.monotonic() - started < 15
    msg = str(info.value)
    assert "model.bin" in msg and "storage.retry.max_wait_s=2" in msg
    # Back up: the multipart upload the abort could not reach is found and removed.
    s3_proxy.revive()
    assert len(uploads(s3_client, f"{s3_bucket}/run")) == 1
    assert storage.abort_uploads(f"{s3_bucket}/run", opts(s3_proxy.endpoint)) == 1
    assert uploads(s3_client, f"{s3_bucket}/run") == []
    assert not storage.exists(f"{s3_bucket}/run/ckpt/model.bin", o)  # never half-visible


def test_a_short_outage_mid_upload_is_ridden_out(s3_proxy, s3_bucket, s3_client) -> None:
    s3_proxy.kill_at_part(2, revive_after_s=1.0)
    patient = RetryPolicy(
        max_attempts=None, max_wait_s=30, initial_backoff_s=0.05, max_backoff_s=0.5
    )
    o = opts(s3_proxy.endpoint, retry=patient)
    data = os.urandom(16 * MiB)
    storage.write_bytes(f"{s3_bucket}/run/model.bin", data, o)
    assert storage.read_bytes(f"{s3_bucket}/run/model.bin", o) == data
    assert uploads(s3_client, f"{s3_bucket}/run") == []


def test_a_failed_part_aborts_the_multipart_upload(s3_proxy, s3_bucket, s3_client) -> None:
    s3_proxy.on_part = lambda count: (403, "AccessDenied") if count >= 2 else None
    o = opts(s3_proxy.endpoint)
    with pytest.raises(PermissionError):
        storage.write_bytes(f"{s3_bucket}/run/model.bin", os.urandom(16 * MiB), o)
    assert uploads(s3_client, f"{s3_bucket}/run") == []  # aborted at once, server reachable


def test_cancel_stops_an_upload_and_aborts_it(s3_server, s3_bucket, s3_client) -> None:
    import threading

    from forge.checkpoint.retry import Cancelled

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        storage.write_bytes(
            f"{s3_bucket}/run/m.bin", os.urandom(11 * MiB), opts(s3_server), cancel=cancel
        )
    assert uploads(s3_client, f"{s3_bucket}/run") == []
    assert not storage.exists(f"{s3_bucket}/run/m.bin", opts(s3_server))


# --------------------------------------------------------------------------------------------
# the lock


def test_second_run_on_the_same_folder_is_refused(s3_server, s3_bucket) -> None:
    o = opts(s3_server)
    run = f"{s3_bucket}/runs/exp1"
    first = RunLock.acquire(run, options=o, heartbeat_s=None, description="recipe digits")
    with pytest.raises(ConfigError) as info:
        RunLock.acquire(run, options=o, heartbeat_s=None)
    msg = str(info.value)
    assert run in msg and "in use by another forge run" in msg
    assert f"pid {os.getpid()}" in msg and "recipe digits" in msg
    assert "alive on this host" in msg and "another run_name" in msg
    first.release()
    assert not storage.exists(f"{run}/{LOCK_NAME}", o)
    RunLock.acquire(run, options=o, heartbeat_s=None).release()


def test_lock_is_a_conditional_put(s3_server, s3_bucket, s3_client) -> None:
    o = opts(s3_server)
    assert storage.create_exclusive(f"{s3_bucket}/l", b"a", o)
    assert not storage.create_exclusive(f"{s3_bucket}/l", b"b", o)
    assert s3_client.get_object(Bucket=s3_bucket[5:], Key="l")["Body"].read() == b"a"


def test_stale_lock_is_taken_over_by_resume_only(s3_server, s3_bucket, caplog) -> None:
    o = opts(s3_server)
    run = f"{s3_bucket}/runs/crashed"
    dead = {
        "token": "x",
        "host": "gone",
        "pid": 1,
        "started_at": 0,
        "heartbeat_at": time.time() - 900,
    }
    storage.write_bytes(f"{run}/{LOCK_NAME}", json.dumps(dead).encode(), o)
    with pytest.raises(ConfigError, match="host gone"):
        RunLock.acquire(run, options=o, stale_after_s=600, heartbeat_s=None)  # a fresh run
    with caplog.at_level(logging.WARNING, logger="forge.checkpoint.lock"):
        lock = RunLock.acquire(
            run, options=o, stale_after_s=600, take_over_stale=True, heartbeat_s=None
        )
    assert "Taking over the lock" in caplog.text and "host gone" in caplog.text
    lock.release()


def test_break_lock_takes_over_a_lock_held_elsewhere(s3_server, s3_bucket) -> None:
    o = opts(s3_server)
    run = f"{s3_bucket}/runs/r"
    held = RunLock.acquire(run, options=o, heartbeat_s=None)
    elsewhere = {**held.info, "host": "another-host"}  # its pid cannot be checked from here
    storage.write_bytes(f"{run}/{LOCK_NAME}", json.dumps(elsewhere).encode(), o)
    with pytest.raises(ConfigError, match="storage.break_lock=true"):
        RunLock.acquire(run, options=o, heartbeat_s=None)
    taker = RunLock.acquire(run, options=o, break_lock=True, heartbeat_s=None)
    held.release()  # not ours any more: must not delete the new holder's lock
    assert storage.exists(f"{run}/{LOCK_NAME}", o)
    taker.release()
    assert not storage.exists(f"{run}/{LOCK_NAME}", o)


def test_heartbeat_keeps_a_long_run_fresh(s3_server, s3_bucket) -> None:
    o = opts(s3_server)
    run = f"{s3_bucket}/runs/long"
    lock = RunLock.acquire(run, options=o, heartbeat_s=0.2)
    first = json.loads(storage.read_bytes(f"{run}/{LOCK_NAME}", o))["heartbeat_at"]
    time.sleep(0.8)
    later = json.loads(storage.read_bytes(f"{run}/{LOCK_NAME}", o))["heartbeat_at"]
    assert later > first
    with pytest.raises(ConfigError):  # fresh heartbeat: even resume=auto may not take it
        RunLock.acquire(run, options=o, stale_after_s=0.5, take_over_stale=True, heartbeat_s=None)
    lock.release()


def test_local_lock_uses_exclusive_create(tmp_path) -> None:
    lock = RunLock.acquire(str(tmp_path / "run"), heartbeat_s=None)
    with pytest.raises(ConfigError):
        RunLock.acquire(str(tmp_path / "run"), heartbeat_s=None)
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


# --------------------------------------------------------------------------------------------
# the driver's probe


def test_probe_missing_bucket_is_a_config_error(s3_server) -> None:
    with pytest.raises(ConfigError, match=r"bucket 'no-such-bucket' does not exist.*aws s3 mb"):
        storage.probe("s3://no-such-bucket/runs", opts(s3_server))


def test_probe_unreachable_endpoint_is_a_config_error() -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        storage.probe("s3://bucket/runs", opts(dead))
    assert time.monotonic() - started < 15
    msg = str(info.value)
    assert "cannot reach the storage" in msg and dead in msg and "storage.endpoint_url" in msg


def test_probe_hides_credentials_in_an_endpoint_url(s3_server) -> None:
    url = s3_server.replace("http://", "http://user:pa55word@")
    with pytest.raises(ConfigError) as info:
        storage.probe("s3://no-such-bucket/x", opts(url))
    assert "pa55word" not in str(info.value)


def test_probe_passes_for_a_good_bucket(s3_server, s3_bucket) -> None:
    storage.probe(f"{s3_bucket}/runs", opts(s3_server))
    storage.probe("memory://anything")  # only remote object stores are probed


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog) -> None:
    import platform
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process (pids are not reused this fast)
    info = {"token": "t", "host": platform.node(), "pid": dead.pid, "heartbeat_at": time.time()}
    run = str(tmp_path / "run")
    storage.write_bytes(f"{run}/{LOCK_NAME}", json.dumps(info).encode())
    with caplog.at_level(logging.WARNING, logger="forge.checkpoint.lock"):
        RunLock.acquire(run, heartbeat_s=None).release()  # a fresh run, no break_lock needed
    assert "that process is gone" in caplog.text
