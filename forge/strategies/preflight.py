"""Driver-side checks of a strategy choice, before any worker starts.

Everything here reads specs and a checkpoint's manifest only (no torch, no Ray), so an
impossible resume is refused with its reason in a second rather than after a launch.

What resumes where:

* forge-loop checkpoints (``model.safetensors`` + ``optim.pt`` from DDP, per-rank
  ``shard-*-of-*`` from FSDP and ZeRO) resume under every loop strategy on any number of
  workers: the format stores each tensor as named flat fragments
  (:mod:`forge.strategies.fragments`), so resharding is arithmetic.
* Lightning checkpoints resume Lightning recipes only. DDP and FSDP ones hold one full state
  dict (any world size); DeepSpeed ones hold the same per-rank fragments as the loop's (plus
  ``lightning.pt``), so they resume under any ZeRO stage on any number of workers. The two
  kinds do not resume each other: Lightning's DDP/FSDP loaders want the full optimizer state
  dict, and its DeepSpeed optimizer state cannot be matched to parameters from that dict.
* DeepSpeed's own ZeRO files (``ds-*``, Lightning checkpoints of forge before the sharded
  format) are not loadable.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

from forge.config.specs import RunSpec
from forge.errors import CheckpointError, ConfigError

_SHARD_INDEX = re.compile(r"^shard-(\d{5})-of-(\d{5})\.json$")
_LIGHTNING_FILES = ("lightning.pt",)
_OLD_DEEPSPEED_PREFIX = "ds-"  # DeepSpeed's own files, as older forge versions stored them
# What resumes a Lightning checkpoint, by whether it is sharded (DeepSpeed's) or full.
_LIGHTNING_RESUMES = {
    True: "a deepspeed_* strategy (any ZeRO stage, any number of workers)",
    False: "strategy=ddp or strategy=fsdp",
}


def check_available(spec: RunSpec) -> None:
    """The strategy's library is installed on the driver (and so, normally, on the workers).

    Example:
        >>> from forge.config.specs import RecipeSpec
        >>> check_available(RunSpec(recipe=RecipeSpec(name="d", module="recipes.digits")))
    """
    if spec.strategy.name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"strategy={spec.strategy.name} needs DeepSpeed, which is not installed. Install it "
            "with pip install 'forge-train[deepspeed]', or choose strategy=fsdp (ZeRO-3-like) "
            "or strategy=ddp."
        )


def check_resumable(spec: RunSpec, uri: str, manifest: Any) -> None:
    """Refuse a checkpoint this run cannot resume from: say why and what would work.

    Args:
        spec: The run about to launch.
        uri: The checkpoint's folder (for the message).
        manifest: Its :class:`~forge.checkpoint.manifest.Manifest`.

    Raises:
        ConfigError: The checkpoint cannot be loaded into this run's layout.
        CheckpointError: The checkpoint is in a format this forge does not load.
    """
    files = set(manifest.files)
    saved_by = f"strategy={manifest.strategy} on {manifest.world_size} worker(s)"
    if any(name.startswith(_OLD_DEEPSPEED_PREFIX) for name in files):
        raise CheckpointError(
            f"{uri} ({saved_by}) holds DeepSpeed's own ZeRO files: it was written by an older "
            "forge and is not loadable (forge no longer unpickles DeepSpeed's files; Lightning "
            "DeepSpeed checkpoints are now forge's sharded format). Start a new run (without "
            "resume=), or resume from a checkpoint this forge wrote."
        )
    lightning = any(name in files for name in _LIGHTNING_FILES)
    shards = {int(m.group(1)): int(m.group(2)) for m in map(_SHARD_INDEX.match, files) if m}
    if spec.recipe.kind == "lightning":
        if not lightning:
            raise ConfigError(
                f"{uri} was written by a forge-loop recipe ({saved_by}); a Lightning recipe "
                "(recipe.kind=lightning) resumes only from its own checkpoints. Load its weights "
                "in the module instead: forge.checkpoint.consolidate(uri) gives the state dict."
            )
        if bool(shards) != spec.strategy.name.startswith("deepspeed"):
            raise ConfigError(
                f"{uri} ({saved_by}) cannot resume under strategy={spec.strategy.name} in a "
                "Lightning recipe: Lightning's DeepSpeed checkpoints (per-rank ZeRO fragments) "
                "and its full DDP/FSDP checkpoints do not convert into each other there. Resume "
                f"with {_LIGHTNING_RESUMES[bool(shards)]}, or start a new run and load the "
                "weights in the module: forge.checkpoint.consolidate(uri) gives the state dict."
            )
    elif lightning:
        raise ConfigError(
            f"{uri} was written by a Lightning recipe ({saved_by}); a forge-loop recipe "
            "(recipe.kind=loop) cannot resume Lightning's training state. Resume it with the "
            "Lightning recipe, or start a new run (resume=null)."
        )
    if shards:
        expected = set(range(manifest.world_size))
        missing = sorted(expected - set(shards))
        if missing or set(shards.values()) != {manifest.world_size}:
            raise ConfigError(
                f"cannot reshard {uri} ({saved_by}): the shards of rank(s) {missing or '?'} are "
                f"missing, so parts of the weights exist nowhere. Resume from an earlier "
                "checkpoint of the run (resume=<its folder>)."
            )
    # Anything else (DDP's model.safetensors + optim.pt) loads under every strategy; what a
    # worker cannot read at all it reports before the first step (StateReader).
