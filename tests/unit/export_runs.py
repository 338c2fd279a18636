"""Small committed checkpoints for the export tests, trained in this process (no Ray)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from forge.checkpoint.store import CheckpointStore
from forge.config.compose import compose
from forge.config.specs import LaunchPlan
from forge.config.validate import to_run_spec
from forge.loop import WorkerContext, run_loop
from forge.run_folder import config_hash, redacted_config, write_provenance

# Shrunk so each trains in about a second on one thread.
RECIPES: dict[str, list[str]] = {
    "digits": ["experiment=digits", "recipe.params.channels=4"],
    "tabular": ["experiment=tabular", "recipe.params.hidden=16"],
    "tinylm": [
        "experiment=tinylm",
        "recipe.params.max_files=2",
        "recipe.params.n_layer=1",
        "recipe.params.n_embd=16",
        "recipe.params.n_head=2",
        "recipe.params.block_size=16",
    ],
    "lightning_digits": ["experiment=lightning_digits", "recipe.params.channels=4"],
}


def overrides_for(recipe: str, storage: str, *extra: str) -> list[str]:
    return [
        *RECIPES[recipe],
        f"storage.uri={storage}",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "trainer.val_every_n_steps=0",
        "checkpoint.every_n_steps=2",
        "checkpoint.keep_last=null",
        "data.batch_size=8",
        "scaling.num_workers=1",
        *extra,
    ]


def train_run(run_uri: str, recipe: str, *extra: str) -> str:
    """Train ``recipe`` for 4 steps into ``run_uri`` (config.yaml written as forge.train does);
    returns the newest checkpoint's URI."""
    cfg = compose(overrides_for(recipe, str(Path(run_uri).parent), *extra))
    saved = redacted_config(cfg)
    spec = to_run_spec(cfg)
    write_provenance(run_uri, saved, [], seed=0, world_size=1, git_sha=None, git_dirty=None)
    plan = LaunchPlan(run_uri=run_uri, config_hash=config_hash(saved), launch_time=time.time())
    if spec.recipe.kind == "lightning":
        _train_lightning(spec, plan)
    else:
        run_loop(spec, plan, WorkerContext())
    latest = CheckpointStore(run_uri).latest()
    assert latest is not None
    return latest.uri


def _train_lightning(spec: Any, plan: LaunchPlan) -> None:
    """A Lightning-path checkpoint without Ray: the module's state dict in forge's format."""
    from forge.checkpoint.serialize import tensors_to_bytes
    from forge.lightning_runner import build_lightning

    module, _ = build_lightning(spec)
    files = {"model.safetensors": tensors_to_bytes(module.state_dict())}
    CheckpointStore(plan.run_uri).save(
        1, files, strategy="ddp", config_hash=plan.config_hash, metrics={"val/accuracy": 0.1}
    )
