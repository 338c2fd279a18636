"""DeepSpeed's own checkpoint files (the Lightning path), loaded without arbitrary pickle.

With ``strategy=deepspeed_*`` a Lightning recipe checkpoints through DeepSpeed, which writes
``torch.save`` files that forge stores as they are (see :mod:`forge.strategies.lightning`).
DeepSpeed reads every one of them back through ``engine.checkpoint_engine.load``, and its stock
engine does that with ``torch.load(weights_only=False)``: a tampered file would run its own code
on every worker that resumes from it. This module closes that gap:

* :class:`SafeCheckpointEngine` loads with ``torch.load(weights_only=True)`` and allows only the
  few DeepSpeed classes these files hold (:data:`SAFE_GLOBALS`); any other object is a
  :class:`~forge.errors.CheckpointError` that names the file and the object.
* :class:`ForgeDeepSpeedStrategy`, what ``make_lightning_strategy`` returns for ``deepspeed_*``,
  installs that engine for every load and refuses the loads that would bypass it. When it saves,
  it drops hyper-parameters (as the DDP/FSDP path does) and, on rank 0, checks that the files
  just written load that way. A checkpoint that could not be resumed fails when it is written,
  not later when a resume needs it.

The module imports DeepSpeed and Ray's Lightning strategies, so import it only for
``deepspeed_*``.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from ray.train.lightning import RayDeepSpeedStrategy

from forge.errors import CheckpointError
from forge.strategies.lightning import without_hyper_parameters

# What DeepSpeed's ZeRO 1/2/3 files hold besides tensors and containers (fp32, bf16, fp16),
# measured with torch.serialization.get_unsafe_globals_in_checkpoint on deepspeed 0.19.
# Why allowing them runs no code: the weights_only unpickler only ever calls an allowed class
# itself (``cls(*args)`` or ``cls.__new__(cls, *args)``), then ``__setstate__`` if the class has
# one, or else updates ``__dict__``. Every argument and state value is again restricted to
# tensors, numbers, strings, containers and allowed classes. None of these four defines
# ``__setstate__``, and their constructors only store values. So a file can set their
# attributes but cannot make anything run.
SAFE_GLOBALS: list[type] = [
    # ``loss_scaler`` in every ZeRO optimizer file, also in fp32/bf16 (a static scale of 1).
    # Its __init__ only stores ``cur_scale`` and ``dynamic``.
    LossScaler,
    # The same field under fp16: its __init__ only stores numbers, flags and a torch.dtype.
    DynamicLossScaler,
    # ``zero_stage`` in the optimizer files. An ``int`` Enum: unpickling is ``ZeroStageEnum(n)``,
    # a lookup of an existing member.
    ZeroStageEnum,
    # ZeRO 1/2 optimizer files, where each parameter's fragment sits in the flat partition. A
    # dataclass of two ints (``numel``, ``start``) with no methods of its own.
    fragment_address,
]

# Lightning's DeepSpeedStrategy.save_checkpoint always passes this tag (the folder in a save).
LIGHTNING_TAG = "checkpoint"


def load_deepspeed_file(path: str | Path, map_location: Any = None, *, mmap: bool = False) -> Any:
    """``torch.load`` one DeepSpeed checkpoint file with ``weights_only=True``.

    Only tensors, plain containers and :data:`SAFE_GLOBALS` load; anything else raises a
    :class:`~forge.errors.CheckpointError` (see :func:`refused_object`).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "optim_states.pt")
        >>> torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2)}, path)
        >>> state = load_deepspeed_file(path)
        >>> state["loss_scaler"].cur_scale, int(state["zero_stage"])
        (1.0, 2)
        >>> torch.save({"run": print}, path)  # an arbitrary callable: refused
        >>> load_deepspeed_file(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        forge.errors.CheckpointError: .../optim_states.pt: refused to load. ... `print`, ...
    """
    try:
        return _weights_only_load(path, map_location, mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load. This DeepSpeed checkpoint file contains "
            f"{refused_object(exc)}, which forge does not unpickle. It loads DeepSpeed's files "
            "with torch.load(weights_only=True) and allows only tensors, plain containers "
            "and DeepSpeed's own loss-scaler, ZeRO-stage and fragment-address classes, "
            "because unpickling anything else can run code chosen by whoever wrote the "
            "file. Either the checkpoint was altered after forge wrote it, or another DeepSpeed "
            "version or tool wrote it. Resume from another checkpoint (resume=<an earlier "
            "step>) or start without resume=, and do not load this file elsewhere unless "
            "you trust where it came from."
        ) from None


def _weights_only_load(path: str | Path, map_location: Any, mmap: bool) -> Any:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def refused_object(exc: pickle.UnpicklingError) -> str:
    """The object torch's weights_only unpickler refused, in words, from its error message.

    Example:
        >>> refused_object(pickle.UnpicklingError(
        ...     "Weights only load failed. ... Unsupported global: GLOBAL posix.system was not "
        ...     "an allowed global by default."))
        'the global `posix.system`'
    """
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"the global `{found.group(1)}`"
    # Other refusals (a disallowed opcode or call): torch's own one-line reason.
    detail = re.search(r"WeightsUnpickler error: (.+)", text)
    reason = detail.group(1) if detail else text.strip().splitlines()[0]
    return f"an object torch will not load with weights_only=True ({reason.strip()})"


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, with loads through :func:`load_deepspeed_file`.

    Saving is unchanged. Install it with :func:`safe_checkpoint_engine` around
    ``engine.load_checkpoint``.
    """

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_deepspeed_file(path, map_location)


@contextmanager
def safe_checkpoint_engine(engine: Any) -> Iterator[None]:
    """Within the block, DeepSpeed ``engine`` reads checkpoint files only via
    :class:`SafeCheckpointEngine`; afterwards its own checkpoint engine is back (saves go on
    through whatever DeepSpeed configured).

    Universal checkpoints are refused, because DeepSpeed reads them with its own
    ``torch.load(weights_only=False)`` and not through the engine.
    """
    if engine.load_universal_checkpoint():
        raise CheckpointError(
            "checkpoint.load_universal is set in the DeepSpeed config, and DeepSpeed loads "
            "universal checkpoints with arbitrary pickle, outside any checkpoint engine. "
            "forge does not load those. Remove load_universal from the DeepSpeed config and "
            "resume from a checkpoint this forge run wrote."
        )
    stock = engine.checkpoint_engine
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    try:
        yield
    finally:
        engine.checkpoint_engine = stock


def check_saved_files(folder: str | Path, rank: int = 0) -> None:
    """Load every ``.pt`` file ``rank`` owns in a DeepSpeed save ``folder`` (the tag folder)
    the way a resume will, and raise a :class:`~forge.errors.CheckpointError` on the first one
    that would be refused.

    A rank owns the files with ``zero_pp_rank_<rank>_`` in the name, and rank 0 also owns the
    shared ones (the same rule as :func:`forge.strategies.lightning.deepspeed_checkpoint_files`).
    Files in torch's zip format are memory-mapped, so this reads the pickled structure and
    not the tensor bytes.
    """
    for path in sorted(Path(folder).rglob("*.pt")):
        owned = f"zero_pp_rank_{rank}_" in path.name or (
            rank == 0 and "zero_pp_rank_" not in path.name
        )
        if not owned:
            continue
        try:
            _weights_only_load(path, "cpu", mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: this DeepSpeed checkpoint holds {refused_object(exc)}, "
                "which forge would refuse to load on resume (it loads DeepSpeed's files with "
                "torch.load(weights_only=True)), so forge refuses to store it. This usually comes "
                "from a callback's state_dict(), the module's on_save_checkpoint() or an "
                "optimizer param_group storing custom classes. Store plain numbers, strings, "
                "lists, dicts or tensors."
            ) from None


class ForgeDeepSpeedStrategy(RayDeepSpeedStrategy):
    """``RayDeepSpeedStrategy`` whose checkpoints load without arbitrary pickle.

    Example:
        >>> type(ForgeDeepSpeedStrategy(stage=2)).__mro__[1].__name__
        'RayDeepSpeedStrategy'
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        super().save_checkpoint(without_hyper_parameters(checkpoint), filepath, storage_options)
        # Every rank wrote the same client state. Rank 0's files hold it, plus the model and
        # optimizer structure, so checking them finds a state that could not be resumed.
        if self.is_global_zero:
            check_saved_files(Path(filepath) / LIGHTNING_TAG)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        if self.load_full_weights:
            # Lightning then reads one file through its CheckpointIO, which is not forge's loader.
            raise CheckpointError(
                "DeepSpeedStrategy(load_full_weights=True) is not supported: forge resumes "
                "only from the DeepSpeed checkpoint folders it wrote. Leave load_full_weights "
                "unset."
            )
        with safe_checkpoint_engine(self.deepspeed_engine):
            return super().load_checkpoint(checkpoint_path, weights_only)
