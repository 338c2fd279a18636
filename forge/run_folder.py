"""The run folder's provenance files: config, overrides, environment, written by the driver.

``<run>/config.yaml``    resolved config (values read from the environment are redacted)
``<run>/overrides.txt``  the command-line overrides, one per line
``<run>/run.json``       git sha + dirty flag, package versions, seed, world size, host, time
"""

from __future__ import annotations

import hashlib
import json
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
REDACTED = "<redacted: from env {}>"


def redacted_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config, with every value that came from ``${oc.env:...}`` replaced.

    Secrets belong in the environment; they never reach a saved config or a log.

    Example:
        >>> cfg = OmegaConf.create({"key": "${oc.env:HOME}", "lr": 0.1})
        >>> redacted_config(cfg)
        {'key': '<redacted: from env HOME>', 'lr': 0.1}
    """
    raw = OmegaConf.to_container(cfg, resolve=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def walk(raw_node: Any, node: Any) -> Any:
        if isinstance(raw_node, dict) and isinstance(node, dict):
            return {k: walk(raw_node.get(k), v) for k, v in node.items()}
        if isinstance(raw_node, list) and isinstance(node, list):
            return [walk(r, v) for r, v in zip(raw_node, node)]
        if isinstance(raw_node, str):
            names = _ENV_INTERPOLATION.findall(raw_node)
            if names:
                return REDACTED.format(",".join(n.strip() for n in names))
        return node

    out = walk(raw, resolved)
    out.pop("hydra", None)
    return out


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
) -> None:
    """Write config.yaml, overrides.txt and run.json into the run folder."""
    storage.write_bytes(
        storage.join(run_uri, "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(config)).encode()
    )
    storage.write_bytes(
        storage.join(run_uri, "overrides.txt"), ("\n".join(overrides) + "\n").encode()
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
    }
    storage.write_bytes(storage.join(run_uri, "run.json"), json.dumps(info, indent=1).encode())
