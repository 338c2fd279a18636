"""The run folder's provenance files: config, overrides, environment, written by the driver.

``<run>/config.yaml``    resolved config (values read from the environment are redacted)
``<run>/overrides.txt``  the command-line overrides, one per line
``<run>/run.json``       git sha + dirty flag, package versions, seed, world size, host, time
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from forge.checkpoint import storage

_ENV_INTERPOLATION = re.compile(r"\$\{oc\.env:([^,}]+)")
REDACTED = "<redacted: from env>"


def redacted_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config, with every value that came from ``${oc.env:...}`` replaced.

    Secrets belong in the environment; they never reach a saved config or a log. A value that
    embeds an environment value indirectly (``url: https://u:${token}@host``) is hidden too.

    Example:
        >>> import os; os.environ["FORGE_DOC_TOKEN"] = "s3cr3t-value"
        >>> cfg = OmegaConf.create(
        ...     {"token": "${oc.env:FORGE_DOC_TOKEN}", "url": "x:${token}", "lr": 0.1}
        ... )
        >>> redacted_config(cfg)
        {'token': '<redacted: from env FORGE_DOC_TOKEN>', 'url': '<redacted: from env>', 'lr': 0.1}
    """
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    secrets = env_secrets(cfg)

    def walk(raw_node: Any, node: Any) -> Any:
        if isinstance(node, dict):
            raw_dict = raw_node if isinstance(raw_node, dict) else {}
            return {k: walk(raw_dict.get(k), v) for k, v in node.items()}
        if isinstance(node, list):
            raw_list = raw_node if isinstance(raw_node, list) else [None] * len(node)
            return [walk(r, v) for r, v in zip(raw_list, node, strict=False)]
        names = _ENV_INTERPOLATION.findall(raw_node) if isinstance(raw_node, str) else []
        if names:
            return f"{REDACTED[:-1]} {','.join(n.strip() for n in names)}>"
        if isinstance(node, str) and any(s in node for s in secrets):
            return REDACTED
        return node

    out = walk(raw, resolved)
    out.pop("hydra", None)
    out.pop("sweep", None)  # configures forge.sweep, not the run (RunSpec has no such key)
    return out


def env_secrets(cfg: DictConfig | dict[str, Any]) -> list[str]:
    """The values that ``${oc.env:NAME}`` interpolations in ``cfg`` read, longest first.

    Values shorter than 4 characters are left out: "1" or "us" would match everywhere and say
    nothing secret.

    Example:
        >>> import os; os.environ["FORGE_DOC_KEY"] = "k-123456"
        >>> env_secrets({"a": "${oc.env:FORGE_DOC_KEY}", "b": 1})
        ['k-123456']
    """
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    env_names = set(_ENV_INTERPOLATION.findall(json.dumps(raw, default=str)))
    values = {v for n in env_names if len(v := os.environ.get(n.strip(), "")) >= 4}
    return sorted(values, key=len, reverse=True)


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced, for messages and console lines.

    Example:
        >>> scrub("seed='k-123456' is invalid", ["k-123456"])
        "seed='<redacted: from env>' is invalid"
    """
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def config_hash(config: dict[str, Any]) -> str:
    """sha256 over the settings that change what is trained (not where or how it is launched)."""
    relevant = {
        k: v for k, v in config.items() if k not in {"ray", "resume", "run_name", "verbose"}
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def git_state(cwd: str | None = None) -> tuple[str | None, bool | None]:
    """(commit sha, dirty?) of the repository forge runs from; (None, None) outside git."""
    cwd = cwd or str(Path(__file__).resolve().parents[1])
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None, None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("forge-train", "torch", "ray", "pytorch-lightning", "hydra-core", "deepspeed"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def write_provenance(
    run_uri: str,
    config: dict[str, Any],
    overrides: Sequence[str],
    *,
    seed: int,
    world_size: int,
    git_sha: str | None,
    git_dirty: bool | None,
    options: storage.StorageOptions | None = None,
    data_fingerprint: dict[str, Any] | None = None,
) -> None:
    """Write config.yaml, overrides.txt and run.json into the run folder (local or remote).

    ``data_fingerprint`` (:mod:`forge.data.fingerprint`) goes into run.json as ``data``.
    """
    storage.write_bytes(
        storage.join(run_uri, "config.yaml"),
        OmegaConf.to_yaml(OmegaConf.create(config)).encode(),
        options,
    )
    storage.write_bytes(
        storage.join(run_uri, "overrides.txt"), ("\n".join(overrides) + "\n").encode(), options
    )
    info = {
        "git_sha": git_sha,
        "git_dirty": git_dirty,
        "versions": versions(),
        "python": platform.python_version(),
        "host": platform.node(),
        "seed": seed,
        "world_size": world_size,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": data_fingerprint,
    }
    storage.write_bytes(
        storage.join(run_uri, "run.json"), json.dumps(info, indent=1).encode(), options
    )


def record_placement(
    run_uri: str,
    ranks: Sequence[dict[str, Any]],
    options: storage.StorageOptions | None = None,
) -> None:
    """Add where each rank runs (node id, IP, host) to ``run.json``; rank 0 calls it.

    Written again after a worker-group restart, which may place ranks elsewhere
    (``placements`` keeps every attempt, ``ranks`` the latest).
    """
    uri = storage.join(run_uri, "run.json")
    try:
        info = json.loads(storage.read_bytes(uri, options))
    except Exception:  # no run.json (a run without provenance): start one
        info = {}
    ranks = sorted(ranks, key=lambda r: r["rank"])
    info["ranks"] = ranks
    info["nodes"] = len({r["node_id"] for r in ranks})
    info.setdefault("placements", []).append(
        {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ranks": ranks}
    )
    storage.write_bytes(uri, json.dumps(info, indent=1).encode(), options)
