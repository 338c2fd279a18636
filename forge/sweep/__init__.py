"""Sweeps on Ray Tune with Hydra's multirun grammar; every trial is a full forge run.

``python -m forge -m sweep=asha 'optim.lr=tag(log,interval(1e-4,1e-1))' seed=0,1`` or
``forge.sweep([...])``. :mod:`forge.sweep.grammar` maps the grammar, :mod:`forge.sweep.spec`
validates every point before Ray starts, :mod:`forge.sweep.trial` is the per-trial forge driver,
:mod:`forge.sweep.run` is the one module that calls Ray Tune, :mod:`forge.sweep.results`
writes trials.csv, best.yaml and plots.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("sweep", "SweepResult"):
        from forge.sweep import run

        return getattr(run, name)
    raise AttributeError(name)


class _CallablePackage(types.ModuleType):
    """Importing any ``forge.sweep.*`` module binds this package as the attribute
    ``forge.sweep``, shadowing the function of that name; calling the package runs the sweep,
    so ``forge.sweep([...])`` works whatever was imported first."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from forge.sweep.run import sweep

        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
