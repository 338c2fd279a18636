"""What a recipe is, and how forge finds one.

A *recipe* is a Python module (shipped ones live in the top-level ``recipes/`` package) that
tells forge what to train. forge owns everything around it: distribution, precision, the
optimizer, checkpoints, logging. Two kinds are first-class:

* **forge loop** (``kind: loop``): the module defines ``Params`` (a dataclass of its knobs) and
  ``build(params) -> forge.Recipe``. forge's own training loop runs it under any strategy.
* **Lightning** (``kind: lightning``): the module defines ``Params`` and
  ``build_lightning(params) -> (LightningModule, LightningDataModule | None)``; an existing
  LightningModule is brought unchanged and run by Lightning on Ray Train workers.

Modules are found by import path (``recipe.module=recipes.digits``) or by file
(``recipe.module=/abs/path/my_recipe.py``). A file travels to the other nodes of a cluster in
a submitted job's runtime env, as a one-file package (:func:`stage_recipe_file`, used by
``forge.jobs``); where the path does not exist, the import finds that copy.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from forge.errors import ConfigError

# Batches are whatever the dataset's collate returns (a tuple of tensors, a dict...).
Batch = Any


@dataclass
class Recipe:
    """Everything the forge loop needs to train one model.

    Attributes:
        model: The module to train, built on CPU (forge moves and wraps it); or a function
            that builds it (``lambda: MyModel(params)``), which lets forge build it where the
            strategy wants: with ``strategy=deepspeed_zero3 strategy.zero_init=true`` every
            parameter is partitioned as it is created, so a large model never exists whole on a
            worker. Such a model must initialize its parameters in its modules' constructors or
            through ``Module.apply`` (DeepSpeed gathers them for it), not by changing them after
            their module was built.
        train_data: A map-style dataset; forge shards it across workers.
        loss_fn: ``(model, batch) -> scalar loss`` for one training batch (already on device).
        val_data: Optional held-out dataset, evaluated every ``trainer.val_every_n_steps``.
        eval_fn: ``(model, batch) -> {name: per-example values}``; forge averages each over the
            whole validation set and all workers and logs it as ``val/<name>``. Defaults to the
            per-batch loss.
        collate_fn: Optional ``DataLoader`` collate function.
        tokens_per_sample: For sequence models: tokens in one sample, so forge logs tokens/s.
        export: What the model takes when served (:class:`ExportSpec`); ``python -m forge
            export`` refuses a recipe without one.

    Example:
        A model that predicts 0 has absolute error ``|y|``; forge averages ``eval_fn``'s
        per-example values over every example (3.0 for y = 1..5), not over batches (batches
        of 2 would give (1.5 + 3.5 + 5) / 3 = 3.33):

        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from forge.config.specs import RunSpec
        >>> from forge.loop import WorkerContext, run_eval
        >>> x, y = torch.zeros(5, 1), torch.arange(1.0, 6.0)
        >>> model = torch.nn.Linear(1, 1)
        >>> _ = torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
        >>> recipe = Recipe(
        ...     model=model,
        ...     train_data=TensorDataset(x, y),
        ...     loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b[0]).squeeze(-1), b[1]),
        ...     val_data=TensorDataset(x, y),
        ...     eval_fn=lambda m, b: {"abs_error": (m(b[0]).squeeze(-1) - b[1]).abs()},
        ... )
        >>> recipe_spec = {"name": "doc", "module": "recipes.digits"}
        >>> spec = RunSpec(recipe=recipe_spec, data={"batch_size": 2})
        >>> run_eval(recipe, model, spec, WorkerContext())
        {'val/abs_error': 3.0}
    """

    model: Any
    train_data: Any
    loss_fn: Callable[[Any, Batch], Any]
    val_data: Any = None
    eval_fn: Callable[[Any, Batch], Mapping[str, Any]] | None = None
    collate_fn: Callable[[list[Any]], Batch] | None = None
    tokens_per_sample: int | None = None
    export: ExportSpec | None = None

    @property
    def builds_model_lazily(self) -> bool:
        """True when ``model`` is a function that builds the model."""
        import torch

        return callable(self.model) and not isinstance(self.model, torch.nn.Module)

    def build_model(self) -> Any:
        """The model: ``model`` itself, or what it returns when it is a function.

        Example:
            >>> import torch
            >>> recipe = Recipe(model=lambda: torch.nn.Linear(2, 1), train_data=[], loss_fn=None)
            >>> recipe.build_model()
            Linear(in_features=2, out_features=1, bias=True)
        """
        return self.model() if self.builds_model_lazily else self.model


@dataclass
class ExportSpec:
    """What a recipe's model takes and returns when served; what export checks it with.

    Attributes:
        input_names: The names of ``forward``'s tensor arguments, in order.
        output_names: Names for the model's outputs, in order.
        example: ``example(n)`` returns ``n`` rows of validation inputs (a tuple of tensors, one
            per input name). Export traces with one such batch and checks parity on others.
        dynamic_dims: Per input, which dims vary and their names: ``{"x": {0: "batch"}}``;
            for a sequence model also ``{1: "seq"}``. Other dims are fixed.
        max_dims: Upper bounds of named dims (``{"seq": 128}``); others are unbounded.
        task: ``classification`` (argmax of the last dim), ``next_token`` (argmax of the last
            dim at every position) or ``regression`` (no task-level check).
        preprocessing: What a client must do to raw data before calling the model (shown in
            the model card), or where the model already does it.

    Example:
        >>> import torch
        >>> spec = ExportSpec(
        ...     input_names=("x",), output_names=("logits",),
        ...     example=lambda n: (torch.zeros(n, 3),), dynamic_dims={"x": {0: "batch"}},
        ...     task="classification", preprocessing="none: raw float features",
        ... )
        >>> spec.example(2)[0].shape
        torch.Size([2, 3])
    """

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    example: Callable[[int], tuple[Any, ...]]
    dynamic_dims: Mapping[str, Mapping[int, str]]
    task: str = "classification"
    preprocessing: str = ""
    max_dims: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @staticmethod
    def rows(tensor: Any, n: int) -> Any:
        """``n`` rows of ``tensor``, cycling when it has fewer (for ``example``).

        Example:
            >>> import torch
            >>> ExportSpec.rows(torch.arange(3), 5).tolist()
            [0, 1, 2, 0, 1]
        """
        import torch

        return tensor[torch.arange(n) % len(tensor)]


def import_recipe_module(module: str) -> ModuleType:
    """Import a recipe by dotted module path or by ``.py`` file path.

    Args:
        module: ``"recipes.digits"`` or ``"/path/to/my_recipe.py"``.

    Returns:
        The imported module.

    Raises:
        ConfigError: The module cannot be found or fails to import.

    Example:
        >>> import_recipe_module("recipes.digits").__name__
        'recipes.digits'
    """
    if module.endswith(".py"):
        path = Path(module).expanduser().resolve()
        if not path.is_file():
            # On another node of the cluster: the launcher shipped the file in the runtime env.
            path = _shipped_copy(path) or path
        if not path.is_file():
            raise ConfigError(
                f"recipe.module={module!r}: no such file. Give an existing .py file or an "
                "importable module path such as recipes.digits."
            )
        name = f"forge_user_recipe_{path.stem}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise ConfigError(
                f"recipe.module={module!r} cannot be imported ({exc}). Use one of the shipped "
                "recipes (python -m forge --help lists them), an importable module path, or a "
                "path to a .py file."
            ) from None
        raise


def params_class(mod: ModuleType) -> type | None:
    """The recipe's ``Params`` dataclass, or None when it takes no parameters."""
    cls = getattr(mod, "Params", None)
    if cls is not None and not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{mod.__name__}.Params must be a dataclass.")
    return cls


def build_params(mod: ModuleType, values: Mapping[str, Any]) -> Any:
    """Validate ``recipe.params`` against the module's ``Params`` dataclass.

    Unknown keys and wrong types raise :class:`ConfigError` naming ``recipe.params.<key>``.

    Example:
        >>> build_params(import_recipe_module("recipes.digits"), {"channels": 8}).channels
        8
    """
    from pydantic import TypeAdapter, ValidationError

    from forge.errors import did_you_mean

    cls = params_class(mod)
    if cls is None:
        if values:
            raise ConfigError(
                f"recipe.params: {mod.__name__} takes no parameters (it defines no Params "
                f"dataclass) but got {sorted(values)}. Remove them."
            )
        return None
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"recipe.params.{key}: unknown parameter for {mod.__name__}."
                f"{did_you_mean(key, known)} Known parameters: {', '.join(sorted(known))}."
            )
    try:
        return TypeAdapter(cls).validate_python(dict(values))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(
            f"recipe.params.{loc}: {err['msg']} (got {err.get('input')!r}). "
            f"Fix the value in the recipe config or the override."
        ) from None


def shipped_package_name(path: str | Path) -> str:
    """Name of the one-file package that carries the recipe file ``path`` to other nodes.

    Derived from the absolute path alone, so the driver and every worker agree on it without
    being told.

    Example:
        >>> shipped_package_name("/home/me/my_recipe.py")
        '_forge_recipe_0121f9adce54'
    """
    import hashlib

    resolved = str(Path(path).expanduser().resolve())
    return "_forge_recipe_" + hashlib.sha256(resolved.encode()).hexdigest()[:12]


def stage_recipe_file(path: str | Path, into: str | Path) -> str:
    """Copy a recipe file into ``into/<shipped_package_name>/``; returns that folder.

    The folder is a package for the runtime env's ``py_modules``: Ray uploads it once and puts
    it on ``sys.path`` of every process of the job (or of the Train workers).
    """
    import shutil

    source = Path(path).expanduser().resolve()
    package = Path(into) / shipped_package_name(source)
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("# a forge recipe file, shipped to the cluster\n")
    shutil.copy2(source, package / source.name)
    return str(package)


def _shipped_copy(path: Path) -> Path | None:
    """The copy of recipe file ``path`` that a runtime env put on ``sys.path``, if any."""
    try:
        found = importlib.util.find_spec(shipped_package_name(path))
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    copy = Path(next(iter(found.submodule_search_locations))) / path.name
    return copy if copy.is_file() else None
