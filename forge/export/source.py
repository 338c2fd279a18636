"""What export starts from: a verified checkpoint, its run's saved config, the rebuilt model.

The recipe and its params are read from ``<run>/config.yaml`` as plain data (``recipe.module``,
``recipe.params``); nothing in it is instantiated through ``_target_``. The weights come from
:func:`forge.checkpoint.consolidate`, so any strategy and world size (DDP, FSDP, ZeRO-1/2/3, the
Lightning path) export the same way. Everything runs on this process's CPU; no Ray.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from forge.checkpoint import storage
from forge.checkpoint.manifest import MANIFEST
from forge.checkpoint.storage import StorageOptions
from forge.checkpoint.store import CheckpointStore, CommittedCheckpoint, open_checkpoint
from forge.errors import CheckpointError, ConfigError
from forge.recipe import ExportSpec, Recipe, build_params, import_recipe_module

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


@dataclass
class ExportSource:
    """A committed checkpoint and everything export needs from its run.

    Attributes:
        checkpoint: The checkpoint (its manifest verified: every file's size and sha256).
        manifest_sha256: sha256 of the checkpoint's ``manifest.json`` bytes.
        run_uri: The run folder the checkpoint belongs to.
        config: The run's saved, resolved config, as data.
        config_hash_matches: Whether that config hashes to the checkpoint manifest's
            ``config_hash`` (False: config.yaml was rewritten after this checkpoint).
        recipe: ``{"name", "module", "kind", "params"}`` from the config.
        model: The model in eval mode, fp32, on CPU, with the checkpoint's weights.
        spec: The recipe's export input spec.
        build_fresh: Builds a new, untrained model of the same recipe (for safetensors).
    """

    checkpoint: CommittedCheckpoint
    manifest_sha256: str
    run_uri: str
    config: dict[str, Any]
    config_hash_matches: bool
    recipe: dict[str, Any]
    model: Any
    spec: ExportSpec
    build_fresh: Callable[[], Any] = field(repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.checkpoint.manifest.metrics)


def resolve_checkpoint(
    uri: str, pick: str = "latest", options: StorageOptions | None = None
) -> tuple[CommittedCheckpoint, str]:
    """The committed, verified checkpoint that ``uri`` names, and its run folder.

    Args:
        uri: A checkpoint folder (``<run>/checkpoints/step_00000300``) or a run folder.
        pick: For a run folder: ``latest`` (the newest that verifies) or ``best`` (by the
            run's ``checkpoint.monitor``).
        options: How to reach remote storage.

    Raises:
        ConfigError: ``uri`` is neither, or ``pick=best`` without a monitored metric.
        CheckpointError: The checkpoint's files do not match its manifest.
    """
    uri = storage.normalize(uri)
    if storage.exists(storage.join(uri, MANIFEST), options):
        ckpt = open_checkpoint(uri, verify=True, options=options)
        parent, _, _ = uri.rpartition("/")
        run_uri, _, last = parent.rpartition("/")
        if last != "checkpoints":
            raise ConfigError(
                f"checkpoint={uri}: export needs the run folder around the checkpoint "
                "(<run>/checkpoints/step_XXXXXXXX) to read the run's config.yaml; this "
                "checkpoint is not inside a checkpoints/ folder."
            )
        return ckpt, run_uri
    if not storage.exists(storage.join(uri, "checkpoints"), options):
        raise ConfigError(
            f"checkpoint={uri}: neither a committed checkpoint (no {MANIFEST}) nor a run folder "
            "(no checkpoints/). Give a folder such as runs/<run>/checkpoints/step_00000300 or "
            "runs/<run>."
        )
    config = read_run_config(uri, options)
    ckpt_cfg = config.get("checkpoint") or {}
    store = CheckpointStore(
        uri, monitor=ckpt_cfg.get("monitor"), mode=ckpt_cfg.get("mode", "min"), options=options
    )
    if pick == "best":
        if not store.monitor:
            raise ConfigError(
                f"export.pick=best: run {uri} was trained without checkpoint.monitor, so no "
                "checkpoint is better than another. Use export.pick=latest or name a checkpoint."
            )
        chosen = store.best()
        if chosen is None:
            raise ConfigError(
                f"export.pick=best: no committed checkpoint of {uri} recorded "
                f"{store.monitor}. Use export.pick=latest or name a checkpoint."
            )
        chosen.verify()
    else:
        chosen = store.latest(verify=True)
        if chosen is None:
            raise ConfigError(f"checkpoint={uri}: the run has no committed checkpoint to export.")
    return chosen, uri


def read_run_config(run_uri: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """The run's saved config, parsed as YAML data (never instantiated)."""
    try:
        data = storage.read_bytes(storage.join(run_uri, CONFIG_FILE), options)
    except FileNotFoundError:
        raise ConfigError(
            f"{run_uri} has no {CONFIG_FILE}: export rebuilds the model from the run's saved "
            "recipe and params, so the run folder must be one forge.train wrote."
        ) from None
    config = yaml.safe_load(data)
    if not isinstance(config, dict) or not isinstance(config.get("recipe"), dict):
        raise ConfigError(f"{run_uri}/{CONFIG_FILE} has no recipe section; it is not forge's.")
    return config


def load_source(
    uri: str, pick: str = "latest", options: StorageOptions | None = None
) -> ExportSource:
    """Verify the checkpoint, read its run's config, rebuild the model and load the weights.

    Raises:
        ConfigError: The recipe gives no export input spec, or the config does not fit.
        CheckpointError: The checkpoint is corrupt or holds weights for another model.
    """
    from forge.checkpoint import consolidate
    from forge.run_folder import config_hash

    ckpt, run_uri = resolve_checkpoint(uri, pick, options)
    manifest_bytes = storage.read_bytes(storage.join(ckpt.uri, MANIFEST), options)
    config = read_run_config(run_uri, options)
    matches = config_hash(config) == ckpt.manifest.config_hash
    if not matches:
        log.warning(
            "%s/%s does not hash to the config_hash of %s: the run's config changed after this "
            "checkpoint (a resume with other overrides?). Exporting with the saved config.",
            run_uri,
            CONFIG_FILE,
            ckpt.uri,
        )
    recipe = {
        "name": config["recipe"].get("name"),
        "module": config["recipe"]["module"],
        "kind": config["recipe"].get("kind", "loop"),
        "params": dict(config["recipe"].get("params") or {}),
    }
    build_fresh, spec = recipe_builders(recipe)
    model = build_fresh()
    state = consolidate(ckpt.uri, options)
    load_weights(model, state, ckpt.uri)
    return ExportSource(
        checkpoint=ckpt,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        run_uri=run_uri,
        config=config,
        config_hash_matches=matches,
        recipe=recipe,
        model=model,
        spec=spec,
        build_fresh=build_fresh,
    )


def recipe_builders(recipe: dict[str, Any]) -> tuple[Callable[[], Any], ExportSpec]:
    """``(build a fresh fp32 eval model, the export spec)`` for a recipe given as data.

    Raises:
        ConfigError: The recipe has no export input spec; the message names what is missing.
    """
    module = recipe["module"]
    mod = import_recipe_module(module)
    params = build_params(mod, recipe.get("params") or {})
    if recipe.get("kind", "loop") == "lightning":
        make_spec = getattr(mod, "export_spec", None)
        if make_spec is None:
            raise ConfigError(
                f"recipe {module} (Lightning) gives no export input spec: define "
                "export_spec(params) -> forge.ExportSpec in the module (input names, an example "
                "batch from the validation data, dynamic dims). See recipes/lightning_digits.py."
            )
        spec = make_spec(params)

        def build() -> Any:
            return mod.build_lightning(params)[0].float().eval()

    else:
        built = mod.build(params)
        if not isinstance(built, Recipe):
            raise ConfigError(f"{module}.build() returned {type(built).__name__}, not a Recipe.")
        if built.export is None:
            raise ConfigError(
                f"recipe {module} gives no export input spec: its build() must pass "
                "forge.Recipe(export=forge.ExportSpec(input_names=..., output_names=..., "
                "example=..., dynamic_dims=...)), which says what the served model takes "
                "(input names, an example batch from the validation data, which dims are "
                "dynamic). See export_spec() in recipes/digits.py."
            )
        spec = built.export
        first = [built.build_model()]

        def build() -> Any:
            # The first call reuses the model build() made; later ones build afresh.
            model = first.pop() if first else mod.build(params).build_model()
            return model.float().eval()

    check_spec(spec, module)
    return build, spec


def check_spec(spec: ExportSpec, module: str) -> None:
    """Refuse an input spec whose pieces do not fit together, naming the piece."""
    if not spec.input_names or not spec.output_names:
        raise ConfigError(f"recipe {module}: ExportSpec needs input_names and output_names.")
    unknown = set(spec.dynamic_dims) - set(spec.input_names)
    if unknown:
        raise ConfigError(
            f"recipe {module}: ExportSpec.dynamic_dims names {sorted(unknown)}, which are not "
            f"in input_names {list(spec.input_names)}."
        )
    if not callable(spec.example):
        raise ConfigError(f"recipe {module}: ExportSpec.example must be a function of n.")


def load_weights(model: Any, state: dict[str, Any], where: str) -> None:
    """Load ``state`` strictly; a mismatch names the missing and unexpected keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{where}: its weights do not fit the model the run's config builds "
            f"({str(exc).splitlines()[0]} ...). Was config.yaml changed after training?"
        ) from None
