"""``safetensors``: the consolidated fp32 weights plus ``config.json`` (recipe name, module and
params), enough to rebuild the model with the recipe's own builder. Tied weights are stored
once and listed in ``config.json`` (safetensors refuses two names for one storage)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from forge.export.artifact import Runner, Written, torch_runner
from forge.recipe import ExportSpec

FILE = "model.safetensors"
CONFIG = "config.json"
CONFIG_FORMAT = "forge.export.model_config"


def write(
    model: Any,
    spec: ExportSpec,
    example: tuple[Any, ...],
    settings: Any,
    workdir: str,
    recipe: dict[str, Any] | None = None,
) -> Written:
    """Save the weights (fp32 floats; integer buffers as they are) and the rebuild config."""
    import torch
    from safetensors.torch import save_file

    from forge.strategies.fragments import tied_names

    aliases = tied_names(model)
    state = {
        name: (t.float() if t.is_floating_point() else t).detach().cpu().contiguous().clone()
        for name, t in model.state_dict().items()
        if name not in aliases
    }
    save_file(state, os.path.join(workdir, FILE), metadata={"format": "pt"})
    config = {
        "format": CONFIG_FORMAT,
        "version": 1,
        "recipe": recipe or {},
        "tied_weights": aliases,
        "inputs": list(spec.input_names),
        "outputs": list(spec.output_names),
        "torch_dtype": str(torch.float32).removeprefix("torch."),
    }
    with open(os.path.join(workdir, CONFIG), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    return Written(files=[FILE, CONFIG], info={"tied_weights": aliases})


def load_into(model: Any, workdir: str) -> Any:
    """Load ``model.safetensors`` (tied names restored) strictly into ``model``; eval mode."""
    from safetensors.torch import load_file

    with open(os.path.join(workdir, CONFIG)) as f:
        config = json.load(f)
    state = load_file(os.path.join(workdir, FILE))
    for alias, target in config.get("tied_weights", {}).items():
        state[alias] = state[target]
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def runtimes(workdir: str, spec: ExportSpec, build: Callable[[], Any]) -> dict[str, Runner]:
    """A freshly built model with the saved weights, as a runner."""
    return {"safetensors": torch_runner(load_into(build(), workdir))}
