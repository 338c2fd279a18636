"""``python -m forge export checkpoint=<uri> [export.key=value ...] [storage.key=value ...]``.

Arguments are Hydra-style overrides on ``configs/export/default.yaml`` (under ``export.``) and
``configs/storage/local.yaml`` (under ``storage.``, for the endpoint and retries of ``s3://``).
They are validated into typed settings, then :func:`forge.export.export` runs; the verb itself
decides nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from forge.errors import ConfigError, did_you_mean

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
USAGE = (
    "python -m forge export checkpoint=<checkpoint or run folder> "
    "[export.formats=[onnx,torch_export,safetensors]] [export.out=<uri>] [export.pick=best] "
    "[storage.endpoint_url=<url>]"
)


def base_config() -> DictConfig:
    """The verb's config before overrides: checkpoint, export.* and storage.*."""
    return OmegaConf.create(
        {
            "checkpoint": None,
            "export": OmegaConf.to_container(
                OmegaConf.load(CONFIG_DIR / "export" / "default.yaml")
            ),
            "storage": OmegaConf.to_container(
                OmegaConf.load(CONFIG_DIR / "storage" / "local.yaml")
            ),
        }
    )


def parse(args: Sequence[str]) -> tuple[str, Any, Any]:
    """``(checkpoint uri, ExportSettings, StorageOptions)`` from the verb's arguments.

    Raises:
        ConfigError: An argument does not parse, names an unknown key, or has a bad value.

    Example:
        >>> uri, settings, _ = parse(["checkpoint=runs/a", "export.formats=[onnx]"])
        >>> uri, settings.formats
        ('runs/a', ['onnx'])
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from pydantic import ValidationError

    from forge.checkpoint.storage import StorageOptions
    from forge.config.specs import StorageSpec
    from forge.export.settings import ExportSettings

    if any(a in ("-h", "--help") for a in args):
        raise ConfigError(f"Usage: {USAGE}")
    cfg = base_config()
    try:
        overrides = OverridesParser.create().parse_overrides(list(args))
    except HydraException as exc:
        raise ConfigError(
            f"Could not parse {list(args)}: {str(exc).splitlines()[0]} Usage: {USAGE}"
        ) from None
    for override in overrides:
        key = override.key_or_group
        if override.is_delete() or override.is_add():
            raise ConfigError(f"{override.input_line}: export takes key=value only. Usage: {USAGE}")
        _check_key(cfg, key)
        OmegaConf.update(cfg, key, override.value(), merge=True)
    if not cfg.checkpoint:
        raise ConfigError(f"export needs checkpoint=<uri>. Usage: {USAGE}")
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    # storage.* says how to reach the checkpoint and export.out; StorageSpec checks its
    # endpoint against storage.uri, so that is the remote one of the two.
    remote = [u for u in (raw["checkpoint"], raw["export"].get("out")) if u and "://" in str(u)]
    if remote:
        raw["storage"]["uri"] = str(remote[0])
    try:
        settings = ExportSettings(**raw["export"])
        storage_spec = StorageSpec(**raw["storage"])
    except ValidationError as exc:
        err = exc.errors()[0]
        section = "export" if exc.title == "ExportSettings" else "storage"
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(
            f"{section}.{loc}: {err['msg']} (got {err.get('input')!r}). Fix the override."
        ) from None
    return str(cfg.checkpoint), settings, StorageOptions.from_spec(storage_spec)


def _check_key(cfg: DictConfig, key: str) -> None:
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
            continue
        if node is None and parts[:2] == ["export", "tolerance"]:
            return  # export.tolerance.<format>.rtol=...: fills a format's null tolerance
        where = ".".join(parts[:i]) or "the top level"
        known = list(node.keys()) if isinstance(node, DictConfig) else []
        raise ConfigError(
            f"Unknown key '{key}' for export.{did_you_mean(part, [str(k) for k in known])} "
            f"Known keys under {where}: {', '.join(map(str, known))}. Usage: {USAGE}"
        )


def main(args: Sequence[str]) -> int:
    """Run the verb; returns the exit code (errors propagate to forge.cli as one paragraph)."""
    from forge.export.core import export
    from forge.progress import make_console

    uri, settings, options = parse(args)
    console = make_console()
    result = export(uri, settings=settings, storage_options=options)
    console.print(result.table, highlight=False, markup=False)
    for fmt, status in result.statuses.items():
        rec = result.manifest["formats"][fmt]
        lat = rec.get("latency", {})
        lat_text = ", ".join(f"{b} p50 {v['p50_ms']:.2f} ms" for b, v in lat.items())
        console.print(
            f"{fmt}: {status}  {rec.get('size_mb', 0):.3f} MiB  {lat_text}", highlight=False
        )
    console.print(f"[bold green]exported[/] {escape(result.uri)}", highlight=False)
    return 0
