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


def _rank_main(
    rank: int, world_size: int, port: int, overrides: list[str], plan: LaunchPlan
) -> None:
    """One rank of a multi-process run without Ray: a gloo group over TCP on 127.0.0.1."""
    import os

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    env = {
        "RANK": rank,
        "LOCAL_RANK": rank,
        "WORLD_SIZE": world_size,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }
    os.environ.update({k: str(v) for k, v in env.items()})
    dist.init_process_group("gloo", rank=rank, world_size=world_size)

    def gather(obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * world_size if rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    ctx = WorkerContext(
        rank=rank,
        local_rank=rank,
        world_size=world_size,
        all_reduce_sum=lambda t: dist.all_reduce(t),
        gather=gather,
    )
    try:
        run_loop(to_run_spec(compose(overrides)), plan, ctx)
    finally:
        dist.destroy_process_group()


def train_run_multi(run_uri: str, recipe: str, world_size: int, *extra: str) -> str:
    """As :func:`train_run`, on ``world_size`` processes (spawned here, no Ray)."""
    import socket

    import torch.multiprocessing as mp

    overrides = overrides_for(recipe, str(Path(run_uri).parent), *extra)
    cfg = compose(overrides)
    saved = redacted_config(cfg)
    write_provenance(
        run_uri, saved, [], seed=0, world_size=world_size, git_sha=None, git_dirty=None
    )
    plan = LaunchPlan(run_uri=run_uri, config_hash=config_hash(saved), launch_time=time.time())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(world_size, port, overrides, plan), nprocs=world_size, join=True)
    latest = CheckpointStore(run_uri).latest()
    assert latest is not None
    return latest.uri
