"""The same ``strategy=`` names for Lightning recipes, mapped onto Ray's Lightning strategies.

=====================  =====================================================================
``strategy=``          Lightning strategy (``ray.train.lightning``)
=====================  =====================================================================
``ddp``                ``RayDDPStrategy`` (bucket size, unused parameters, bucket views)
``fsdp``               ``RayFSDPStrategy``: ``FULL_SHARD``/``SHARD_GRAD_OP``, a unit per block,
                       ``state_dict_type="full"`` so checkpoints reach forge as one dict
``deepspeed_zero1-3``  ``ForgeDeepSpeedStrategy(stage=...)`` with the offload options, a
                       ``RayDeepSpeedStrategy`` that loads checkpoints ``weights_only``
                       (:mod:`forge.strategies.deepspeed_files`)
=====================  =====================================================================

Lightning's FSDP and DeepSpeed strategies refuse the CPU accelerator, so the config check
(``RunSpec``) rejects them without ``scaling.use_gpu=true`` before anything launches, and only
``ddp`` runs (and is tested) on CPU.

Checkpoints always go through forge's store: DDP and FSDP as Lightning's full checkpoint dict
(captured in memory by the runner's CheckpointIO); FSDP resumes from a node-local copy of that
dict, since Lightning's FSDP loader reads a file. DeepSpeed writes its own ZeRO files (every rank
its partitions); each rank hands forge the files it wrote, and on resume every rank fetches them
back into a node-local folder for ``engine.load_checkpoint``. DeepSpeed reads them through
forge's checkpoint engine, ``torch.load(weights_only=True)`` with a short allowlist of DeepSpeed's
own classes, so a tampered file is refused instead of run; forge drops hyper-parameters from
what it saves and checks each save loads that way. They load only on the world size that wrote
them; the driver refuses another one before launch.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forge.checkpoint.store import CommittedCheckpoint
from forge.config.specs import RunSpec
from forge.strategies.modules import find_blocks

DEEPSPEED_PREFIX = "ds-"  # forge file names of DeepSpeed's own checkpoint files


def make_lightning_strategy(spec: RunSpec, module: nn.Module) -> Any:
    """The Ray Lightning strategy for ``strategy.name``.

    Example:
        >>> from forge.config.specs import RecipeSpec
        >>> spec = RunSpec(recipe=RecipeSpec(name="x", module="recipes.lightning_digits",
        ...                                  kind="lightning"))
        >>> type(make_lightning_strategy(spec, nn.Linear(2, 2))).__name__  # doctest: +SKIP
        'RayDDPStrategy'
    """
    from ray.train.lightning import RayDDPStrategy, RayFSDPStrategy

    strategy = spec.strategy
    if strategy.name == "ddp":
        return RayDDPStrategy(
            bucket_cap_mb=strategy.bucket_cap_mb,
            find_unused_parameters=strategy.find_unused_parameters,
            gradient_as_bucket_view=strategy.gradient_as_bucket_view,
        )
    if strategy.name == "fsdp":
        blocks = {type(b) for b in find_blocks(module, strategy.block_classes)}
        return RayFSDPStrategy(
            sharding_strategy={"full_shard": "FULL_SHARD"}.get(strategy.sharding, "SHARD_GRAD_OP"),
            auto_wrap_policy=blocks or None,
            state_dict_type="full",
        )
    # Imported here: it imports DeepSpeed, which the other strategies do not need.
    from forge.strategies.deepspeed_files import ForgeDeepSpeedStrategy

    return ForgeDeepSpeedStrategy(**deepspeed_kwargs(spec))


def deepspeed_kwargs(spec: RunSpec) -> dict[str, Any]:
    """Lightning ``DeepSpeedStrategy`` arguments for a ``deepspeed_*`` strategy.

    Example:
        >>> from forge.config.specs import RecipeSpec, ScalingSpec, StrategySpec
        >>> spec = RunSpec(recipe=RecipeSpec(name="x", module="m", kind="lightning"),
        ...                strategy=StrategySpec(name="deepspeed_zero3_offload",
        ...                                      offload_optimizer="cpu", offload_params="cpu"),
        ...                scaling=ScalingSpec(use_gpu=True))
        >>> kw = deepspeed_kwargs(spec)
        >>> kw["stage"], kw["offload_optimizer"], kw["offload_parameters"]
        (3, True, True)
    """
    s = spec.strategy
    kwargs: dict[str, Any] = {
        "stage": s.zero_stage,
        "offload_optimizer": s.offload_optimizer != "none",
        "offload_parameters": s.offload_params != "none",
    }
    if s.offload_optimizer != "none":
        kwargs["offload_optimizer_device"] = s.offload_optimizer
    if s.offload_params != "none":
        kwargs["offload_params_device"] = s.offload_params
    if s.nvme_path:
        kwargs["nvme_path"] = s.nvme_path
    return kwargs


def without_hyper_parameters(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Lightning's checkpoint dict minus the module's and datamodule's hyper-parameters.

    forge rebuilds both from ``recipe.params``, and hyper-parameters may be any object, which
    would not load with ``weights_only``. Used for every Lightning checkpoint forge writes.

    Example:
        >>> without_hyper_parameters({"epoch": 1, "hyper_parameters": {"x": 1},
        ...                           "hparams_name": "kwargs"})
        {'epoch': 1}
    """
    import pytorch_lightning as pl

    keys = {
        getattr(holder, attr)
        for holder in (pl.LightningModule, pl.LightningDataModule)
        for attr in (
            "CHECKPOINT_HYPER_PARAMS_KEY",
            "CHECKPOINT_HYPER_PARAMS_NAME",
            "CHECKPOINT_HYPER_PARAMS_TYPE",
        )
    }
    return {k: v for k, v in checkpoint.items() if k not in keys}


def uses_deepspeed_files(spec: RunSpec) -> bool:
    """True when checkpoints are DeepSpeed's own files (Lightning + ``deepspeed_*``)."""
    return spec.recipe.kind == "lightning" and spec.strategy.name.startswith("deepspeed")


def _node_local(kind: str, key: str) -> Path:
    # The same path on every node (Lightning broadcasts rank 0's path to all ranks).
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"forge-{kind}-{digest}"


def deepspeed_checkpoint_files(
    trainer: Any, run_uri: str, step: int, rank: int
) -> dict[str, bytes]:
    """Let Lightning/DeepSpeed save, then take the files this rank wrote.

    Each rank owns the files with its data-parallel rank in the name
    (``zero_pp_rank_<r>_...``); rank 0 also takes the shared ones (model states, ``latest``).
    """
    folder = _node_local("ds-save", f"{run_uri}/{step}")
    trainer.save_checkpoint(str(folder))  # every rank: DeepSpeed writes its own partitions
    mine = f"zero_pp_rank_{rank}_"
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        owned = mine in name or (rank == 0 and "zero_pp_rank_" not in name)
        if owned:
            files[DEEPSPEED_PREFIX + name.replace("/", "--")] = path.read_bytes()
            path.unlink()
    return files


def resume_path(
    spec: RunSpec,
    ckpt: CommittedCheckpoint,
    stage: Callable[[str, dict[str, Any]], None],
    checkpoint_dict: Callable[[CommittedCheckpoint], dict[str, Any]],
) -> str:
    """What to pass as ``trainer.fit(ckpt_path=...)`` to resume from ``ckpt``.

    DDP: the checkpoint's URI, served from memory by the runner's CheckpointIO (``stage``).
    FSDP: a node-local file of the same dict (Lightning's FSDP loader reads files itself).
    DeepSpeed: a node-local folder with DeepSpeed's files as they were written.
    """
    if uses_deepspeed_files(spec):
        folder = _node_local("ds-resume", ckpt.uri)
        for name in ckpt.manifest.files:
            if name.startswith(DEEPSPEED_PREFIX):
                _write_atomic(
                    folder / name[len(DEEPSPEED_PREFIX) :].replace("--", "/"), ckpt.read(name)
                )
        return str(folder)
    if spec.strategy.name == "fsdp":
        buf = io.BytesIO()
        torch.save(checkpoint_dict(ckpt), buf)
        path = _node_local("fsdp-resume", ckpt.uri).with_suffix(".ckpt")
        _write_atomic(path, buf.getvalue())
        return str(path)
    stage(ckpt.uri, checkpoint_dict(ckpt))
    return ckpt.uri


def _write_atomic(path: Path, data: bytes) -> None:
    """Ranks on one node write the same file: each writes a private copy, then renames it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
