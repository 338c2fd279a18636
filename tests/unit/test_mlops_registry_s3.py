"""The registry on a real S3-compatible server (moto's): versions, aliases moved by
``If-None-Match`` conditional puts (two concurrent movers: one wins), rollback, audit log."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
from mlops_stubs import make_export, make_profile

from forge.checkpoint.storage import StorageOptions
from forge.mlops.registry import AliasConflictError, Registry

pytestmark = pytest.mark.s3


def test_registry_on_s3(s3_server, s3_bucket, tmp_path):
    options = StorageOptions(endpoint_url=s3_server)
    reg = Registry(f"{s3_bucket}/registry", options)
    frame = pd.DataFrame({"a": np.arange(100.0)})
    for step in (1, 2, 3):
        make_export(
            f"{s3_bucket}/run/exports/step_{step:08d}",
            np.ones((1, 2)) * step,
            np.zeros(2),
            metrics={"val/accuracy": 0.9},
            profile=make_profile(frame),
            options=options,
        )
        reg.register("tab", f"{s3_bucket}/run/exports/step_{step:08d}")
    assert reg.versions("tab") == [1, 2, 3] and reg.models() == ["tab"]
    assert reg.get("tab", 2).profile().features == ["a"]
    assert reg.get("tab", 2).meta["source_run"] == f"{s3_bucket}/run"
    reg.promote("tab", 1)

    # Two movers that both read generation 1 write generation 2 at the same moment.
    barrier, outcome = threading.Barrier(2), {}

    def move(version: int) -> None:
        barrier.wait()
        try:
            reg.promote("tab", version, expected_generation=1)
            outcome[version] = "won"
        except AliasConflictError:
            outcome[version] = "lost"

    threads = [threading.Thread(target=move, args=(v,)) for v in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome.values()) == ["lost", "won"]
    winner = next(v for v, o in outcome.items() if o == "won")
    assert reg.resolve("registry://tab@champion").version == winner
    assert reg.rollback("tab")["version"] == 1
    assert reg.resolve("tab@champion").version == 1
    actions = [e["action"] for e in reg.audit("tab")]
    assert actions[:4] == ["register"] * 3 + ["promote"]
    assert sorted(actions[4:6]) == ["promote", "promote-conflict"]
    assert actions[6] == "rollback"
