"""The forge loop on a file source without Ray: a fake Ray Train shard stands in for
``get_dataset_shard``, so the feed, epoch draining, exact validation and the epoch-boundary
resume run in one process."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from forge.checkpoint.store import CheckpointStore
from forge.config.compose import compose
from forge.config.specs import LaunchPlan
from forge.config.validate import to_run_spec
from forge.data.feed import SplitRows
from forge.data.prepare import prepare
from forge.data.source import read_batches
from forge.loop import WorkerContext, run_loop

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
from make_tabular_data import write

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeShard:
    """What ``get_dataset_shard`` returns, for one worker holding every row; records how far
    each epoch's iterator was consumed."""

    def __init__(self, frames: list[pd.DataFrame]) -> None:
        self.frame = pd.concat(frames, ignore_index=True)
        self.epochs: list[dict[str, Any]] = []

    def iter_batches(self, *, batch_size, batch_format, drop_last=False, **shuffle):
        if self.epochs:
            assert self.epochs[-1]["finished"], "a new epoch started before the last finished"
        record = {"batches": 0, "finished": False, "seed": shuffle.get("local_shuffle_seed")}
        self.epochs.append(record)
        order = np.random.default_rng(record["seed"]).permutation(len(self.frame))
        frame = self.frame.iloc[order].reset_index(drop=True)
        stop = len(frame) - (len(frame) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            record["batches"] += 1
            yield frame.iloc[start : start + batch_size]
        record["finished"] = True


@pytest.fixture()
def file_run(tmp_path, monkeypatch):
    import ray.train

    write(str(tmp_path / "loans"), rows=1200, shards=2)

    def make(*overrides: str):
        spec = to_run_spec(
            compose(
                [
                    "experiment=tabular",
                    f"storage.uri={tmp_path / 'runs'}",
                    f"data.source={tmp_path / 'loans'}",
                    "data.label=default",
                    "data.val_fraction=0.25",
                    "data.batch_size=100",  # ~900 train rows: 9 batches per epoch
                    "scaling.num_workers=1",
                    "trainer.log_every_n_steps=1",
                    "trainer.val_every_n_steps=5",
                    "checkpoint.keep_last=null",
                    *overrides,
                ]
            )
        )
        data = prepare(spec)
        table = data.table
        frames = list(read_batches(table.source))
        shards = {
            "train": FakeShard([SplitRows(table, "train")(f) for f in frames]),
            "val": FakeShard([SplitRows(table, "val")(f) for f in frames]),
        }
        monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shards[name])
        plan = LaunchPlan(
            run_uri=str(tmp_path / "runs" / "r"),
            config_hash="x",
            launch_time=time.time(),
            data_fingerprint=data.fingerprint,
            data_table=table,
        )
        return spec, plan, shards, data

    return make


def test_file_source_trains_validates_exactly_and_records_its_fingerprint(file_run) -> None:
    spec, plan, shards, data = file_run("trainer.max_steps=20", "checkpoint.every_n_steps=10")
    per_epoch = data.table.train_rows // 100
    summary = run_loop(spec, plan, WorkerContext())
    assert summary["step"] == 20 and summary["epoch"] == 20 // per_epoch
    finished = shards["train"].epochs[:-1]
    assert [e["batches"] for e in finished] == [per_epoch] * len(finished)  # drained to the end
    seeds = [e["seed"] for e in shards["train"].epochs]
    assert len(set(seeds)) == len(seeds)  # a new shuffle each epoch
    assert 0 < summary["val/accuracy"] <= 1
    manifest = json.loads(Path(summary["last_checkpoint"], "manifest.json").read_text())
    assert manifest["data_fingerprint"] == data.fingerprint


def test_resume_inside_an_epoch_restarts_that_epoch_and_says_so(file_run, caplog) -> None:
    spec, plan, shards, data = file_run("trainer.max_steps=12", "checkpoint.every_n_steps=12")
    per_epoch = data.table.train_rows // 100  # 9 or so: step 12 is inside epoch 1
    run_loop(spec, plan, WorkerContext())
    more, plan2, shards2, _ = file_run("trainer.max_steps=30", "checkpoint.every_n_steps=0")
    with caplog.at_level(logging.WARNING, logger="forge"):
        summary = run_loop(more, plan2, WorkerContext())
    done_in_epoch = 12 - per_epoch
    assert (
        f"Resumed at step 12 inside epoch 1 of data.source: the epoch starts over (its "
        f"{done_in_epoch} batches" in caplog.text
    )
    assert summary["step"] == 30
    first = shards2["train"].epochs[0]
    assert first["batches"] == per_epoch and first["finished"]  # the whole epoch 1 again
    assert shards2["train"].epochs[0]["seed"] == shards["train"].epochs[1]["seed"]  # same shuffle
    assert CheckpointStore(plan.run_uri).latest().step == 30
    # The training steps of the resumed run: epoch 1 runs a whole epoch again from step 13.
    rows = [json.loads(x) for x in Path(plan.run_uri, "metrics.jsonl").read_text().splitlines()]
    epoch_of = {r["step"]: r["epoch"] for r in rows if "epoch" in r and r["step"] > 12}
    assert [s for s in sorted(epoch_of) if epoch_of[s] == 1] == list(range(13, 13 + per_epoch))
