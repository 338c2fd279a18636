"""Checkpoints streamed to a real S3-compatible server by real Ray workers (2 per run).

The server is moto's, over HTTP on 127.0.0.1; faults are real too: a proxy in front of it that
answers ``503 SlowDown`` or dies mid-upload (connections cut, new ones refused), and a moto
process killed with SIGKILL. forge.train is called as a user would, with ``storage.uri=s3://...``.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import boto3
import pytest

import forge
from forge.checkpoint import storage
from forge.checkpoint.lock import LOCK_NAME
from forge.checkpoint.storage import StorageOptions
from forge.checkpoint.store import CheckpointStore
from forge.errors import CheckpointError, ConfigError

pytestmark = [pytest.mark.ray, pytest.mark.s3]

FAST = ["trainer.log_every_n_steps=5", "data.batch_size=16", "trainer.val_every_n_steps=0"]
# optim.pt of this model is ~5.8 MB: with 5 MiB parts it goes up as a 2-part multipart upload.
BIG = ["recipe.params.channels=200", "storage.part_size_mb=5"]


def s3_overrides(ray: str, endpoint: str, bucket: str, *extra: str) -> list[str]:
    return [
        f"ray.address={ray}",
        f"storage.uri={bucket}/runs",
        f"storage.endpoint_url={endpoint}",
        *FAST,
        *extra,
    ]


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket[5:], Prefix=prefix)
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []))


def open_uploads(client, bucket: str) -> list[dict]:
    return client.list_multipart_uploads(Bucket=bucket[5:]).get("Uploads", [])


def ray_storage_files() -> list[Path]:
    root = Path(tempfile.gettempdir(), "forge-ray-train")
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_checkpoints_stream_to_s3_and_resume_from_there_with_nothing_local(
    ray_cluster, s3_server, s3_proxy, s3_bucket, s3_client, quiet_console, tmp_path, monkeypatch
):
    """Run 1 saves to S3 while a second run on the same folder is refused. Run 2 resumes from
    S3 with nothing local, skipping a truncated shard, through a server that throttles."""
    monkeypatch.chdir(tmp_path)  # a relative local run folder would show up here
    common = ["run_name=exp", "checkpoint.every_n_steps=5", *BIG]
    args = s3_overrides(ray_cluster, s3_server, s3_bucket, *common)
    outcome: dict = {}

    def first_run() -> None:
        try:
            outcome["result"] = forge.train([*args, "trainer.max_steps=10"], console=quiet_console)
        except BaseException as exc:  # re-raised in the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=first_run)
    thread.start()
    lock_key = "runs/exp/" + LOCK_NAME
    deadline = time.time() + 60
    while lock_key not in keys(s3_client, s3_bucket, "runs/exp/") and thread.is_alive():
        assert time.time() < deadline, "the first run never took its lock"
        time.sleep(0.1)
    # A second run on the same run folder, while the first holds it: refused before it starts.
    with pytest.raises(ConfigError) as refused:
        forge.train([*args, "trainer.max_steps=10", "resume=auto"], console=quiet_console)
    msg = str(refused.value)
    assert f"{s3_bucket}/runs/exp is in use by another forge run" in msg
    assert "alive on this host" in msg  # so not even break_lock takes it over
    thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    first = outcome["result"]
    assert first.global_step == 10
    assert first.last_checkpoint == f"{s3_bucket}/runs/exp/checkpoints/step_00000010"

    found = keys(s3_client, s3_bucket)
    assert lock_key not in found  # released at the end
    for name in ("config.yaml", "overrides.txt", "run.json", "metrics.jsonl"):
        assert f"runs/exp/{name}" in found, name
    assert any(k.startswith("runs/exp/tensorboard/") for k in found)
    assert "runs/exp/checkpoints/latest.json" in found
    for step in (5, 10):
        prefix = f"runs/exp/checkpoints/step_{step:08d}/"
        assert {k[len(prefix) :] for k in found if k.startswith(prefix)} == {
            "manifest.json", "model.safetensors", "optim.pt",
            "rank0.safetensors", "rank1.safetensors",
        }  # fmt: skip
    manifest = json.loads(
        s3_client.get_object(
            Bucket=s3_bucket[5:], Key="runs/exp/checkpoints/step_00000010/manifest.json"
        )["Body"].read()  # fmt: skip
    )
    assert manifest["step"] == 10 and manifest["world_size"] == 2
    assert manifest["strategy"] == "ddp" and len(manifest["config_hash"]) == 64
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"].values())
    assert open_uploads(s3_client, s3_bucket) == []
    assert not any(tmp_path.iterdir()), "nothing of the run may be written locally"
    # One owner of checkpoint bytes: Ray's own storage holds none of them.
    for path in ray_storage_files():
        assert path.name not in manifest["files"] and path.stat().st_size < 100_000, path

    # The newest checkpoint's model shard is truncated (a partial write by some other tool):
    # resume=auto, with no local state at all, skips it and uses the one before. Every 4th
    # request to the server is answered 503 SlowDown meanwhile: retried, the run completes.
    key = "runs/exp/checkpoints/step_00000010/model.safetensors"
    body = s3_client.get_object(Bucket=s3_bucket[5:], Key=key)["Body"].read()
    s3_client.put_object(Bucket=s3_bucket[5:], Key=key, Body=body[: len(body) // 2])
    s3_proxy.fail_every = 4
    throttled = s3_overrides(ray_cluster, s3_proxy.endpoint, s3_bucket, *common)
    second = forge.train([*throttled, "trainer.max_steps=20", "resume=auto"], console=quiet_console)
    assert second.global_step == 20
    assert s3_proxy.injected >= 10
    out = quiet_console.file.getvalue().replace("\n", "")
    assert f"Skipping checkpoint {s3_bucket}/runs/exp/checkpoints/step_00000010" in out
    assert "truncated or partial upload" in out
    assert f"resumed from {s3_bucket}/runs/exp/checkpoints/step_00000005" in out
    options = StorageOptions(endpoint_url=s3_server)
    rows = storage.read_bytes(f"{s3_bucket}/runs/exp/metrics.jsonl", options).splitlines()
    steps = [json.loads(r)["step"] for r in rows if b"train/loss" in r]
    # One row per step: resuming from step 5 drops the first attempt's row of step 10 (issue 8:
    # everything a run appends is idempotent across resumes); steps 6..10 were trained again.
    assert steps == [5, 10, 15, 20]
    # keep_last=3 (the default): the newest three remain, step 10 rewritten by the second run
    ckpts = sorted(
        {k.split("/")[3] for k in keys(s3_client, s3_bucket, "runs/exp/checkpoints/step_")}
    )
    assert ckpts == ["step_00000010", "step_00000015", "step_00000020"]
    CheckpointStore(second.run_dir, options=options).latest().verify()


def test_server_dies_mid_upload_and_comes_back_with_on_outage_defer(
    ray_cluster, s3_proxy, s3_bucket, s3_client, quiet_console
):
    s3_proxy.kill_at_part(3, revive_after_s=6)  # the 2nd checkpoint's first part
    result = forge.train(
        s3_overrides(
            ray_cluster, s3_proxy.endpoint, s3_bucket, "trainer.max_steps=15",
            "checkpoint.every_n_steps=5", "checkpoint.keep_last=null",
            "storage.on_outage=defer", "storage.retry.max_wait_s=2", *BIG,
        ),
        console=quiet_console,
    )  # fmt: skip
    assert result.global_step == 15
    assert s3_proxy.alive and s3_proxy.parts > 3
    out = quiet_console.file.getvalue().replace("\n", "")
    assert "storage slow or unreachable" in out
    options = StorageOptions(endpoint_url=s3_proxy.endpoint)
    store = CheckpointStore(result.run_dir, options=options)
    steps = [c.step for c in store.committed()]
    assert steps[0] == 5 and steps[-1] == 15 and set(steps) <= {5, 10, 15}
    assert result.last_checkpoint == store.step_uri(15)
    for ckpt in store.committed():
        ckpt.verify()
    # Nothing half-written is visible or left over: every step folder is committed, and no
    # multipart upload is open.
    folders = {k.split("/")[3] for k in keys(s3_client, s3_bucket, "runs/") if "/step_" in k}
    assert folders == {f"step_{s:08d}" for s in steps}
    assert open_uploads(s3_client, s3_bucket) == []


def test_server_killed_mid_upload_fails_the_run_clearly(
    ray_cluster, killable_s3, make_s3_proxy, quiet_console
):
    boto3.client("s3", endpoint_url=killable_s3.endpoint).create_bucket(Bucket="killed")
    proxy = make_s3_proxy(killable_s3.endpoint)  # only to know when the 3rd part is sent

    def kill_server(count: int):
        if count == 3:
            killable_s3.kill()  # SIGKILL, mid multipart upload of the 2nd checkpoint
            raise ConnectionAbortedError("server killed")

    proxy.on_part = kill_server
    started = time.time()
    with pytest.raises(CheckpointError) as info:
        forge.train(
            s3_overrides(
                ray_cluster, proxy.endpoint, "s3://killed", "trainer.max_steps=50",
                "checkpoint.every_n_steps=5", "storage.retry.max_wait_s=3", *BIG,
                "trainer.max_failures=0",  # a restart would only meet the dead server again
            ),
            console=quiet_console,
        )  # fmt: skip
    msg = str(info.value)
    assert "step 10 was not saved" in msg and "storage.retry.max_wait_s=3" in msg
    assert "resume=auto" in msg and "storage.on_outage=defer" in msg
    assert "Traceback" not in msg
    assert time.time() - started < 120
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "?") not in msg
