"""Overrides as text: the ones a config was made from, and values written in Hydra's grammar.

The run folder records the overrides of a run (``overrides.txt``) and the summary prints a
command that resumes it; both must compose the *same* config again, whichever way the run was
started (command line, ``forge.train([...])``, ``forge.train(forge.compose([...]))``, or a
config changed after composing). Values that came from ``${oc.env:...}`` stay written as
interpolations, never resolved.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Hydra reads these unquoted as a plain string (not a number, bool, null, list or sweep).
_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_.\-/]*$")
_NOT_PLAIN = {"true", "false", "null", "none", "nan", "inf"}


def hydra_value(value: Any) -> str:
    """``value`` as Hydra's override grammar reads it back.

    Example:
        >>> hydra_value("lr=0.001"), hydra_value("exp1"), hydra_value([1, "a b"]), hydra_value(None)
        ('"lr=0.001"', 'exp1', '[1,"a b"]', 'null')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _NOT_PLAIN:
        return text
    # Hydra's quoted strings: escape the quote, and double the backslashes that precede one
    # (or end the string).
    body = re.sub(r'(\\*)("|$)', lambda m: m.group(1) * 2 + ('\\"' if m.group(2) else ""), text)
    return f'"{body}"'


def override_key(item: str) -> str:
    """The key an override sets (``+a.b=1`` -> ``a.b``).

    Example:
        >>> override_key("++trainer.max_steps=3"), override_key("~seed")
        ('trainer.max_steps', 'seed')
    """
    return item.lstrip("+~").split("=", 1)[0]


def overrides_for(cfg: DictConfig, config_dir: str | None = None) -> list[str]:
    """Overrides that compose ``cfg`` from the root config.

    The ones :func:`forge.compose` remembered when they still produce ``cfg``; otherwise (a
    config changed after composing, or built another way) every difference from the default
    config, written out key by key.
    """
    from forge.config.compose import compose, remembered_overrides

    raw = _raw(cfg)
    remembered = remembered_overrides(cfg)
    if remembered is not None and _raw(compose(remembered, config_dir)) == raw:
        return remembered
    return config_as_overrides(raw, _raw(compose([], config_dir)))


def config_as_overrides(raw: dict[str, Any], default: dict[str, Any]) -> list[str]:
    """Overrides that turn ``default`` into ``raw`` (both unresolved containers).

    Example:
        >>> config_as_overrides({"a": {"b": 2, "c": "x y"}}, {"a": {"b": 1, "d": 0}})
        ['a.b=2', '++a.c="x y"', '~a.d']
    """
    want, have = _leaves(raw), _leaves(default)
    out = []
    for key, value in want.items():
        if key not in have:
            out.append(f"++{key}={hydra_value(value)}")
        elif have[key] != value:
            out.append(f"{key}={hydra_value(value)}")
    out += [f"~{key}" for key in have if key not in want and not _under(key, want)]
    return out


def _under(key: str, leaves: dict[str, Any]) -> bool:
    # A leaf of the default that became part of a replaced subtree is set by that override.
    return any(key.startswith(k + ".") for k in leaves)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _raw(cfg: DictConfig) -> dict[str, Any]:
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(raw, dict)
    raw.pop("hydra", None)
    return raw


def without_keys(overrides: Sequence[str], keys: set[str]) -> list[str]:
    """``overrides`` minus those that set one of ``keys``.

    Example:
        >>> without_keys(["run_name=a", "+resume=auto", "seed=1"], {"run_name", "resume"})
        ['seed=1']
    """
    return [o for o in overrides if override_key(o) not in keys]
