"""File sources end to end on the shared Ray cluster: Parquet on the moto S3 server sharded over
two workers (default set); CSV, resume after a worker kill, and a worker-count change on resume
(slow)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import forge
from forge.checkpoint import storage
from forge.checkpoint.storage import StorageOptions

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
from data_probe_recipe import read_log
from make_tabular_data import write

pytestmark = pytest.mark.ray
PROBE = str(Path(__file__).parent / "data_probe_recipe.py")
ROWS = 1600  # 2 workers x 16 batches x 50 rows: one epoch covers every row exactly
COLUMNS = "data.columns=[id,age,income,debt_ratio,region,plan]"


def probe_overrides(
    ray: str, source: str, out: Path, *extra: str, params: str = "kill_rank: -1"
) -> list[str]:
    return [
        f"ray.address={ray}",
        f"recipe.module={PROBE}",
        "recipe.name=probe",
        "~recipe.params",
        f"+recipe.params={{out: '{out}', {params}}}",
        f"data.source={source}",
        "data.label=default",
        COLUMNS,
        "data.batch_size=50",
        "trainer.log_every_n_steps=4",
        "optim=sgd",
        *extra,
    ]


def test_parquet_on_s3_is_sharded_over_two_workers(
    ray_cluster, s3_server, s3_bucket, s3_client, tmp_path, quiet_console
):
    local = tmp_path / "loans"
    for path in write(str(local), rows=ROWS, shards=4):
        s3_client.upload_file(path, s3_bucket[5:], f"loans/{os.path.basename(path)}")
    out = tmp_path / "probe"
    result = forge.train(
        probe_overrides(
            ray_cluster,
            f"{s3_bucket}/loans/*.parquet",
            out,
            f"storage.uri={s3_bucket}/runs",
            f"storage.endpoint_url={s3_server}",
            "run_name=s3data",
            "trainer.max_steps=16",  # one epoch: 800 rows per worker
            "trainer.val_every_n_steps=0",
            "checkpoint.every_n_steps=8",
        ),
        console=quiet_console,
    )
    assert result.global_step == 16
    shards = [{i for _, ids in read_log(str(out), rank) for i in ids} for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == ROWS // 2  # non-empty, no row twice
    assert not shards[0] & shards[1]  # disjoint
    assert shards[0] | shards[1] == set(range(ROWS))  # the union is the data
    # Provenance: profile and fingerprint in the run folder, the same fingerprint in manifests.
    options = StorageOptions(endpoint_url=s3_server)
    run = f"{s3_bucket}/runs/s3data"
    profile = json.loads(storage.read_bytes(f"{run}/data_profile.json", options))
    info = json.loads(storage.read_bytes(f"{run}/run.json", options))
    manifest = json.loads(storage.read_bytes(f"{result.last_checkpoint}/manifest.json", options))
    assert profile["format"] == "forge.data_profile" and profile["rows"] == ROWS
    assert (
        info["data"]["sha256"] == profile["fingerprint"] == manifest["data_fingerprint"]["sha256"]
    )
    assert [f["path"] for f in info["data"]["files"]] == [
        f"{s3_bucket}/loans/part-0000{i}.parquet" for i in range(4)
    ]
    assert all(f["version"].startswith("etag:") for f in info["data"]["files"])
    age = profile["columns"]["age"]
    assert sum(age["histogram"]["counts"]) == age["count"] == ROWS


@pytest.mark.slow
def test_csv_source_with_validation_split(ray_cluster, tmp_path, quiet_console):
    write(str(tmp_path / "csv"), rows=2000, shards=2, fmt="csv")
    result = forge.train(
        probe_overrides(
            ray_cluster,
            str(tmp_path / "csv"),
            tmp_path / "probe",
            f"storage.uri={tmp_path}/runs",
            "data.val_fraction=0.2",
            "data.split_key=id",
            "trainer.max_steps=8",
            "trainer.val_every_n_steps=4",
        ),
        console=quiet_console,
    )
    assert result.global_step == 8 and "val/loss" in result.metrics
    profile = json.loads(Path(result.run_dir, "data_profile.json").read_text())
    seen = {i for r in (0, 1) for _, ids in read_log(str(tmp_path / "probe"), r) for i in ids}
    val_share = 1 - profile["rows"] / 2000
    assert abs(val_share - 0.2) < 0.04
    assert len(seen) <= profile["rows"]


@pytest.mark.slow
def test_worker_kill_resumes_at_the_start_of_the_epoch(ray_cluster, tmp_path, quiet_console):
    write(str(tmp_path / "loans"), rows=ROWS, shards=4)
    out = tmp_path / "probe"
    # 16 steps per epoch; checkpoint at 20 (epoch 1, batch 4); rank 1 dies at its 23rd batch.
    result = forge.train(
        probe_overrides(
            ray_cluster,
            str(tmp_path / "loans"),
            out,
            f"storage.uri={tmp_path}/runs",
            "trainer.max_steps=40",
            "trainer.val_every_n_steps=0",
            "checkpoint.every_n_steps=20",
            params="kill_rank: 1, kill_at_call: 23",
        ),
        console=quiet_console,
    )
    text = quiet_console.file.getvalue()
    assert result.global_step == 40
    assert (out / "killed").exists()
    assert "Resumed at step 20 inside epoch 1 of data.source: the epoch starts over" in text
    for rank in (0, 1):
        batches = read_log(str(out), rank)
        first_pid = batches[0][0]
        after = [ids for pid, ids in batches if pid != first_pid]
        assert len(after) == 40 - 20  # steps 21..40 after the restart
        # The restarted epoch is whole again: its first 16 batches hold 800 distinct rows.
        assert len({i for ids in after[:16] for i in ids}) == ROWS // 2


@pytest.mark.slow
def test_worker_count_change_on_resume_reshards(ray_cluster, tmp_path, quiet_console):
    write(str(tmp_path / "loans"), rows=ROWS, shards=4)
    common = [f"storage.uri={tmp_path}/runs", "run_name=grow", "trainer.val_every_n_steps=0"]
    first = forge.train(
        probe_overrides(
            ray_cluster, str(tmp_path / "loans"), tmp_path / "a", *common, "trainer.max_steps=16"
        ),
        console=quiet_console,
    )
    assert first.global_step == 16
    # A resume must keep recipe.params (out included): the first run's logs move aside instead.
    (tmp_path / "a").rename(tmp_path / "first")
    second = forge.train(
        probe_overrides(
            ray_cluster,
            str(tmp_path / "loans"),
            tmp_path / "a",
            *common,
            "resume=auto",
            "scaling.num_workers=1",
            "trainer.max_steps=48",  # 32 more steps: one whole epoch of 1600 rows on 1 worker
        ),
        console=quiet_console,
    )
    assert second.global_step == 48
    batches = read_log(str(tmp_path / "a"), 0)
    assert len(batches) == 32 and not (tmp_path / "a" / "rank1.log").exists()
    assert {i for _, ids in batches for i in ids} == set(range(ROWS))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero2"])
def test_a_file_source_trains_under_sharded_strategies(
    ray_cluster, tmp_path, quiet_console, strategy
):
    """Ray Data's shards feed FSDP and ZeRO ranks as they feed DDP's: disjoint, every row once."""
    write(str(tmp_path / "loans"), rows=ROWS, shards=4)
    out = tmp_path / "probe"
    result = forge.train(
        probe_overrides(
            ray_cluster,
            str(tmp_path / "loans"),
            out,
            f"storage.uri={tmp_path}/runs",
            f"strategy={strategy}",
            "trainer.max_steps=16",  # one epoch: 800 rows per worker
            "trainer.val_every_n_steps=0",
            "checkpoint.every_n_steps=8",
        ),
        console=quiet_console,
    )
    assert result.global_step == 16 and result.last_checkpoint
    shards = [{i for _, ids in read_log(str(out), rank) for i in ids} for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == ROWS // 2
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(ROWS))
