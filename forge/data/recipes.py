"""How a recipe takes a file source: ``build(params, data)`` gets the checked
:class:`~forge.data.prepare.TableInfo` (columns, categories, label classes, training statistics)
and returns a :class:`forge.Recipe` whose batches are what ``data.encode`` makes of a pandas batch.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

from forge.errors import ConfigError


def accepts_file_source(mod: ModuleType) -> bool:
    """Whether the recipe's ``build`` takes a ``data`` argument.

    Example:
        >>> import recipes.tabular, recipes.digits
        >>> accepts_file_source(recipes.tabular), accepts_file_source(recipes.digits)
        (True, False)
    """
    build = getattr(mod, "build", None)
    if build is None:
        return False
    return "data" in inspect.signature(build).parameters


def check_file_source(mod: ModuleType, module_name: str, kind: str) -> None:
    """Refuse ``data.source`` for a recipe that cannot take one, naming the fix.

    Raises:
        ConfigError: A Lightning recipe, or a ``build`` without a ``data`` parameter.
    """
    if kind != "loop" or not accepts_file_source(mod):
        raise ConfigError(
            f"data.source is set, but recipe {module_name} trains only on its own data (its "
            "build() takes no `data` argument). Use a recipe that takes a file source "
            "(recipe=tabular), give yours a build(params, data=None), or remove data.source."
        )


def build_with_table(mod: ModuleType, params: Any, table: Any, module_name: str) -> Any:
    """``mod.build(params, data=table)``, refused when the recipe cannot take it."""
    check_file_source(mod, module_name, "loop")
    return mod.build(params, data=table)
