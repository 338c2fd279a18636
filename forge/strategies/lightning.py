"""The same ``strategy=`` names for Lightning recipes, mapped onto Lightning strategies that
run on Ray Train workers (:mod:`forge.strategies.lightning_ray`, not ``ray.train.lightning``,
whose classes belong to ``lightning.pytorch`` whenever that package is installed).

=====================  =====================================================================
``strategy=``          Lightning strategy
=====================  =====================================================================
``ddp``                ``RayTrainDDPStrategy`` (bucket size, unused parameters, bucket views)
``fsdp``               ``RayTrainFSDPStrategy``: ``FULL_SHARD``/``SHARD_GRAD_OP``, a unit per
                       block, ``state_dict_type="full"`` so checkpoints reach forge as one dict
``deepspeed_zero1-3``  ``ForgeDeepSpeedStrategy(stage=...)`` with the offload options, a
                       Lightning ``DeepSpeedStrategy`` whose checkpoints are forge's sharded
                       format (:mod:`forge.strategies.deepspeed_files`)
=====================  =====================================================================

Lightning's FSDP and DeepSpeed strategies refuse the CPU accelerator, so the config check
(``RunSpec``) rejects them without ``scaling.use_gpu=true`` before anything launches, and only
``ddp`` runs on CPU (the DeepSpeed unit tests get past that check with a test-only subclass).

Checkpoints always go through forge's store, and ``Trainer.save_checkpoint(CAPTURE_PATH)`` never
writes a file. DDP and FSDP store Lightning's full checkpoint dict (captured in memory by the
runner's CheckpointIO); FSDP resumes from a node-local copy of that dict, since Lightning's FSDP
loader reads a file. DeepSpeed stores what the forge loop's DeepSpeed strategy does: every rank
the fragments of fp32 master weights and optimizer state its ZeRO partition holds
(:mod:`forge.strategies.fragments`), and rank 0 the rest of Lightning's dict as
:data:`LIGHTNING_FILE`. Those resume under any ZeRO stage on any number of workers, and
``forge.checkpoint.consolidate`` reads them; they do not resume Lightning DDP/FSDP runs (nor
full checkpoints DeepSpeed ones), which the driver refuses before launch. Nothing in a Lightning
checkpoint is arbitrary pickle: hyper-parameters are dropped, and :data:`LIGHTNING_FILE` is
checked to load with ``weights_only=True`` when it is written.
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

from forge.checkpoint.serialize import bytes_to_object, object_to_bytes
from forge.checkpoint.store import CommittedCheckpoint
from forge.config.specs import RunSpec
from forge.errors import CheckpointError
from forge.strategies.modules import find_blocks

LIGHTNING_FILE = "lightning.pt"  # the rest of Lightning's checkpoint dict: loops, schedulers...

# The path Trainer.save_checkpoint is given so that the checkpoint is kept in memory for forge
# (by the runner's CheckpointIO, or by ForgeDeepSpeedStrategy), never written to a file.
CAPTURE_PATH = "forge-capture://checkpoint"


def is_capture_path(path: Any) -> bool:
    """Whether ``path`` is :data:`CAPTURE_PATH` as a strategy hands it on.

    Lightning's FSDP strategy passes ``Path(filepath)`` to the CheckpointIO, and ``Path`` folds
    the ``//``: compared as given, the checkpoint would be written to a file of that name and
    forge would store nothing.

    Example:
        >>> is_capture_path(CAPTURE_PATH), is_capture_path(Path(CAPTURE_PATH))
        (True, True)
        >>> is_capture_path("/tmp/epoch=1.ckpt")
        False
    """
    return str(path) in (CAPTURE_PATH, str(Path(CAPTURE_PATH)))


def make_lightning_strategy(spec: RunSpec, module: nn.Module) -> Any:
    """The Lightning strategy for ``strategy.name``, on this Ray Train worker.

    Example:
        >>> from forge.config.specs import RecipeSpec
        >>> spec = RunSpec(recipe=RecipeSpec(name="x", module="recipes.lightning_digits",
        ...                                  kind="lightning"))
        >>> type(make_lightning_strategy(spec, nn.Linear(2, 2))).__name__
        'RayTrainDDPStrategy'
    """
    from forge.strategies.lightning_ray import RayTrainDDPStrategy, RayTrainFSDPStrategy

    strategy = spec.strategy
    if strategy.name == "ddp":
        return RayTrainDDPStrategy(
            bucket_cap_mb=strategy.bucket_cap_mb,
            find_unused_parameters=strategy.find_unused_parameters,
            gradient_as_bucket_view=strategy.gradient_as_bucket_view,
        )
    if strategy.name == "fsdp":
        blocks = {type(b) for b in find_blocks(module, strategy.block_classes)}
        return RayTrainFSDPStrategy(
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
    return kwargs  # no nvme_path: StrategySpec refuses NVMe offload for now


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


def uses_fragments(spec: RunSpec) -> bool:
    """True when Lightning checkpoints are forge's sharded fragments (``deepspeed_*``).

    Example:
        >>> from forge.config.specs import RecipeSpec, ScalingSpec, StrategySpec
        >>> uses_fragments(RunSpec(recipe=RecipeSpec(name="x", module="m", kind="lightning"),
        ...                        strategy=StrategySpec(name="deepspeed_zero2"),
        ...                        scaling=ScalingSpec(use_gpu=True)))
        True
    """
    return spec.recipe.kind == "lightning" and spec.strategy.name.startswith("deepspeed")


def lightning_state_bytes(state: dict[str, Any]) -> bytes:
    """:data:`LIGHTNING_FILE`'s bytes for ``state``, Lightning's checkpoint dict without model,
    optimizer and hyper-parameters; refused now if it would not load back with
    ``weights_only=True``, rather than when a resume needs it.

    Example:
        >>> len(lightning_state_bytes({"epoch": 1, "global_step": 8})) > 0
        True
        >>> lightning_state_bytes({"callbacks": {"c": print}})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        forge.errors.CheckpointError: ... callback's state_dict() ...
    """
    data = object_to_bytes(state)
    try:
        bytes_to_object(data, LIGHTNING_FILE)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc} The Lightning training state holds objects forge cannot reload safely; this "
            "usually comes from a callback's state_dict() or the module's on_save_checkpoint() "
            "storing custom classes. Store plain numbers, strings, lists, dicts or tensors."
        ) from None
    return data


def read_lightning_state(ckpt: CommittedCheckpoint) -> dict[str, Any]:
    """The Lightning dict :data:`LIGHTNING_FILE` of ``ckpt`` holds (loops, schedulers...)."""
    if LIGHTNING_FILE not in ckpt.manifest.files:
        raise CheckpointError(
            f"{ckpt.uri} was not written by a Lightning recipe (it has no {LIGHTNING_FILE}), so "
            "it cannot resume one. Resume from a checkpoint of a recipe.kind=lightning run."
        )
    state = bytes_to_object(ckpt.read(LIGHTNING_FILE), LIGHTNING_FILE)
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt.uri}/{LIGHTNING_FILE} is not a Lightning state dict.")
    return state


def _node_local(kind: str, key: str) -> Path:
    # The same path on every node (Lightning broadcasts rank 0's path to all ranks).
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"forge-{kind}-{digest}"


def resume_path(
    spec: RunSpec,
    ckpt: CommittedCheckpoint,
    strategy: Any,
    stage: Callable[[str, dict[str, Any]], None],
    checkpoint_dict: Callable[[CommittedCheckpoint], dict[str, Any]],
) -> str:
    """What to pass as ``trainer.fit(ckpt_path=...)`` to resume from ``ckpt``.

    DeepSpeed: the checkpoint's URI, with ``ckpt`` staged in ``strategy`` (the trainer's
    ``ForgeDeepSpeedStrategy``), whose ``load_checkpoint`` reads this rank's fragments.
    DDP: the checkpoint's URI, with its full dict served from memory by the runner's
    CheckpointIO (``stage``). FSDP: a node-local file of that dict (Lightning's FSDP loader
    reads files itself).
    """
    if uses_fragments(spec):
        strategy.stage(ckpt)
        return ckpt.uri
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
