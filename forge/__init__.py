"""forge: turn a training idea into a resilient distributed training run.

Three ways in, all first-class::

    python -m forge trainer.max_steps=200          # Hydra overrides
    forge.train(["experiment=digits"])              # library API (returns a RunResult)
    forge.submit(["experiment=digits"], address="http://head:8265")  # a Ray cluster's jobs

Nothing heavy (torch, ray, hydra) is imported by ``import forge``; names load on first use.

Example:
    >>> import forge
    >>> cfg = forge.compose(["trainer.max_steps=5"])
    >>> cfg.trainer.max_steps
    5
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; resolved lazily in __getattr__ so `import forge` stays cheap.
_EXPORTS = {
    "compose": "forge.config.compose",
    "train": "forge.api",
    "sweep": "forge.sweep.run",
    "SweepResult": "forge.sweep.run",
    "submit": "forge.jobs",
    "JobHandle": "forge.jobs",
    "RunResult": "forge.api",
    "Recipe": "forge.recipe",
    "ExportSpec": "forge.recipe",
    "export": "forge.export",
    "ExportResult": "forge.export",
    "ForgeError": "forge.errors",
    "ConfigError": "forge.errors",
    "ClusterError": "forge.errors",
    "TrainingError": "forge.errors",
    "CheckpointError": "forge.errors",
}

__all__ = [
    "CheckpointError",
    "ClusterError",
    "ConfigError",
    "ExportResult",
    "ExportSpec",
    "ForgeError",
    "JobHandle",
    "Recipe",
    "RunResult",
    "SweepResult",
    "TrainingError",
    "__version__",
    "compose",
    "export",
    "submit",
    "sweep",
    "train",
]

if TYPE_CHECKING:
    from forge.api import RunResult, train
    from forge.config.compose import compose
    from forge.errors import CheckpointError, ClusterError, ConfigError, ForgeError, TrainingError
    from forge.export import ExportResult, export
    from forge.jobs import JobHandle, submit
    from forge.recipe import ExportSpec, Recipe
    from forge.sweep.run import SweepResult, sweep


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'forge' has no attribute {name!r}")
