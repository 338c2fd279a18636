"""Lightning's DeepSpeed strategy with checkpoints in forge's sharded format.

With ``strategy=deepspeed_*`` a Lightning recipe runs under :class:`ForgeDeepSpeedStrategy`
(what ``make_lightning_strategy`` returns), a Lightning ``DeepSpeedStrategy`` on a Ray Train
worker whose checkpoints are
those of the forge loop's DeepSpeed strategy, not DeepSpeed's own pickled files:

* **Save** (``Trainer.save_checkpoint(CAPTURE_PATH)``, on every rank): each rank takes the fp32
  master weights and optimizer state its ZeRO partition holds as fragments
  (:func:`forge.strategies.deepspeed.engine_fragments`); rank 0 adds ``lightning.pt``, the rest
  of Lightning's checkpoint dict (loops, LR schedulers, callbacks, precision state) without
  model, optimizer or hyper-parameters, and the engine's step counters in its index. The
  runner collects them with :meth:`ForgeDeepSpeedStrategy.take_files` and stores them through
  forge's checkpoint store; nothing is written to disk here.
* **Resume**: the runner stages the checkpoint (:meth:`ForgeDeepSpeedStrategy.stage`) and
  passes its URI as ``ckpt_path``. Lightning calls :meth:`ForgeDeepSpeedStrategy.load_checkpoint`
  on every rank once the engine exists; it loads this rank's ranges into the engine
  (:func:`forge.strategies.deepspeed.load_engine_state`, which reshards: any ZeRO stage, any
  world size) and returns the dict from ``lightning.pt``. Lightning restores loops, callbacks
  and LR schedulers from that dict, and no model or optimizer state: under DeepSpeed its
  ``lightning_restore_optimizer`` is False and ``load_model_state_dict`` does nothing (forge
  never sets ``load_full_weights``).

``forge.checkpoint.consolidate`` turns such a checkpoint into the LightningModule's state dict
(the engine's module *is* the LightningModule, so the names match). A ``Trainer.save_checkpoint``
to any other path (a recipe's own ``ModelCheckpoint``) is Lightning's usual DeepSpeed folder,
which forge neither stores nor loads.

The module imports DeepSpeed and Lightning's DeepSpeed strategy, so import it only for
``deepspeed_*``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from forge.checkpoint.store import CommittedCheckpoint
from forge.errors import CheckpointError
from forge.strategies import FilePayload
from forge.strategies.deepspeed import engine_fragments, load_engine_state
from forge.strategies.fragments import is_sharded
from forge.strategies.lightning import (
    LIGHTNING_FILE,
    is_capture_path,
    lightning_state_bytes,
    read_lightning_state,
    without_hyper_parameters,
)
from forge.strategies.lightning_ray import FromRayTrain

# Engine counters, saved and restored as they are rather than derived from the step (as the
# forge loop does): that needs neither Lightning's accumulation nor the batch size, keeps the
# samples seen before a world-size change, and keeps the fp16 overflows (skipped steps).
ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


class ForgeDeepSpeedStrategy(FromRayTrain, pl.strategies.DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` on a Ray Train worker, whose checkpoints are forge's
    sharded fragments.

    Example:
        >>> isinstance(ForgeDeepSpeedStrategy(stage=2), pl.strategies.DeepSpeedStrategy)
        True
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._captured: dict[str, FilePayload] | None = None
        self._staged: dict[str, CommittedCheckpoint] = {}

    def stage(self, ckpt: CommittedCheckpoint) -> None:
        """Make ``trainer.fit(ckpt_path=ckpt.uri)`` resume from ``ckpt``."""
        self._staged[ckpt.uri] = ckpt

    def take_files(self) -> dict[str, FilePayload]:
        """This rank's files of the last ``Trainer.save_checkpoint(CAPTURE_PATH)``."""
        captured, self._captured = self._captured, None
        if captured is None:
            raise CheckpointError("Lightning produced no checkpoint to save (internal error).")
        return captured

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if not is_capture_path(filepath):  # not forge's: Lightning's own DeepSpeed folder
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        engine = self.deepspeed_engine
        rank = self.global_rank
        writer = engine_fragments(engine, engine.optimizer.optimizer, rank, self.world_size)
        if rank == 0:
            writer.meta["engine_counters"] = {n: int(getattr(engine, n)) for n in ENGINE_COUNTERS}
        files = writer.files()
        if rank == 0:
            # DeepSpeed's fragments replace the (ZeRO-3: empty) state_dict and the optimizer's.
            rest = without_hyper_parameters(checkpoint)
            rest.pop("state_dict", None)
            rest.pop("optimizer_states", None)
            files[LIGHTNING_FILE] = lightning_state_bytes(rest)
        self._captured = files

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        ckpt = self._staged.pop(str(checkpoint_path), None)
        if ckpt is None:
            raise CheckpointError(
                f"ckpt_path={checkpoint_path}: forge resumes a Lightning DeepSpeed run only from "
                "a forge checkpoint (resume=<checkpoint folder>), not from DeepSpeed's own files."
            )
        if not is_sharded(ckpt):
            raise CheckpointError(
                f"{ckpt.uri} (strategy={ckpt.manifest.strategy}) holds no forge shards, so a "
                "Lightning DeepSpeed run cannot resume from it. Resume with "
                f"strategy={ckpt.manifest.strategy}."
            )
        checkpoint = read_lightning_state(ckpt)
        engine = self.deepspeed_engine
        meta = load_engine_state(engine, engine.optimizer.optimizer, self.global_rank, ckpt)
        for name, value in meta.get("engine_counters", {}).items():
            setattr(engine, name, value)
        return checkpoint
