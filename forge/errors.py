"""Errors forge raises on purpose, each with a message that names the problem and the fix.

The CLI prints these as one paragraph and exits non-zero; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ForgeError(Exception):
    """Base class for errors whose message is meant for the user, not a traceback."""


class ConfigError(ForgeError):
    """The configuration is wrong; raised before any worker starts.

    Example:
        >>> from forge.config.compose import compose
        >>> from forge.config.validate import to_run_spec
        >>> to_run_spec(compose(["trainer.max_steps=0"]))
        Traceback (most recent call last):
        ...
        forge.errors.ConfigError: trainer.max_steps=0 is invalid: ... trainer.max_steps=<value> ...
    """


class ClusterError(ForgeError):
    """The Ray cluster cannot run what was asked (resources, address, GPUs)."""


class TrainingError(ForgeError):
    """Training failed on the workers; the message carries the root cause, not Ray's wrapping."""


class NonFiniteError(TrainingError):
    """The loss, the gradients or the weights became NaN/inf; names the step and which one."""


class CheckpointError(ForgeError):
    """A checkpoint is missing, corrupt, or cannot be written."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' Did you mean X?' suffix when ``word`` is close to one of ``choices``, else ''.

    Example:
        >>> did_you_mean("max_step", ["max_steps", "max_epochs"])
        " Did you mean 'max_steps'?"
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
