"""A resume continues the same run: what may change against the checkpoint's saved config.

The run folder's ``config.yaml`` (written by the driver at every launch) is the config the
checkpoint was trained with. Before launch, the new config is compared with it:

* ``recipe.*`` (the recipe, its module and kind, and every ``recipe.params`` key: model shape,
  data split) must be equal, or the run is refused naming the differing keys; otherwise the
  workers would fail loading a state dict into another model, or worse, train on other data.
* Everything else (``trainer.max_steps``, ``optim.lr``, ``strategy``, ``scaling``, ...) may
  change; the changes are returned so the driver prints and records them (``resumes.json``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import yaml

from forge.checkpoint import storage
from forge.checkpoint.storage import StorageOptions
from forge.errors import ConfigError

#: Top-level sections that must match the checkpoint's config.
FIXED_ON_RESUME = ("recipe",)
#: Keys that say where and how a launch happens, not what is trained; never compared.
_LAUNCH_KEYS = {"resume", "run_name", "verbose", "ray"}
RESUMES = "resumes.json"


def run_folder_of(checkpoint_uri: str) -> str:
    """``<run>/checkpoints/step_00000100`` -> ``<run>``.

    Example:
        >>> run_folder_of("s3://b/runs/exp/checkpoints/step_00000100")
        's3://b/runs/exp'
    """
    return checkpoint_uri.rstrip("/").rsplit("/", 2)[0]


def saved_config(run_uri: str, options: StorageOptions | None = None) -> dict[str, Any] | None:
    """The config a run was last launched with (its ``config.yaml``), or None if it has none."""
    try:
        data = yaml.safe_load(storage.read_bytes(storage.join(run_uri, "config.yaml"), options))
    except (FileNotFoundError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def compare(before: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every leaf key whose value differs, as ``{key: (before, now)}`` (launch keys left out).

    Example:
        >>> compare({"optim": {"lr": 0.1}, "seed": 0}, {"optim": {"lr": 0.2}, "seed": 0})
        {'optim.lr': (0.1, 0.2)}
    """
    a, b = _leaves(before), _leaves(now)
    out = {}
    for key in sorted(a.keys() | b.keys()):
        if key.split(".", 1)[0] in _LAUNCH_KEYS:
            continue
        if a.get(key, _MISSING) != b.get(key, _MISSING):
            out[key] = (a.get(key, _MISSING), b.get(key, _MISSING))
    return out


def check_resume_config(
    before: dict[str, Any], now: dict[str, Any], checkpoint_uri: str
) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume that would train another recipe or model; return the allowed changes.

    Raises:
        ConfigError: A ``recipe.*`` key differs from the checkpoint's config; the message names
            each key with both values.

    Example:
        >>> check_resume_config({"recipe": {"name": "digits"}}, {"recipe": {"name": "tabular"}},
        ...                     "runs/r/checkpoints/step_00000010")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        forge.errors.ConfigError: resume: the checkpoint ... recipe.name='digits' (now 'tabular')...
    """
    changes = compare(before, now)
    fixed = {k: v for k, v in changes.items() if k.split(".", 1)[0] in FIXED_ON_RESUME}
    if fixed:
        listed = "; ".join(f"{k}={_show(a)} (now {_show(b)})" for k, (a, b) in fixed.items())
        raise ConfigError(
            f"resume: the checkpoint {checkpoint_uri} was trained with another recipe or model: "
            f"{listed}. A resume continues the same run; run the command the run printed (its "
            f"overrides are in {run_folder_of(checkpoint_uri)}/overrides.txt), or start a new "
            "run (another run_name, without resume)."
        )
    return changes


def record_resume(
    run_uri: str,
    checkpoint_uri: str,
    step: int,
    changes: dict[str, tuple[Any, Any]],
    options: StorageOptions | None = None,
) -> None:
    """Append this resume and its changed keys to ``<run>/resumes.json`` (driver, under the
    run lock, so no other writer)."""
    uri = storage.join(run_uri, RESUMES)
    try:
        history = json.loads(storage.read_bytes(uri, options))
    except (FileNotFoundError, ValueError):
        history = []
    history.append(
        {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checkpoint": checkpoint_uri,
            "step": step,
            "changed": {k: [_plain(a), _plain(b)] for k, (a, b) in changes.items()},
        }
    )
    storage.write_bytes(uri, json.dumps(history, indent=1).encode(), options)


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``optim.lr 0.001 -> 0.0005, trainer.max_steps 300 -> 600``."""
    return ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())


class _Missing:
    def __repr__(self) -> str:
        return "<unset>"


_MISSING = _Missing()


def _plain(value: Any) -> Any:
    return None if value is _MISSING else value


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node} if prefix else {}
