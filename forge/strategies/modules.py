"""Model transforms every strategy applies, in one order: activation checkpointing -> compile
-> sharding/wrapping (torchtitan's order).

Why this order: checkpointing first, so the compiled region contains the recompute logic
instead of compile tracing through (and breaking at) the checkpoint boundary; compile per
block before sharding, so FSDP's all-gather/reduce-scatter hooks stay *outside* the compiled
graphs, between blocks, where they overlap with compute. Both transforms work in place and keep
parameter names (``module.compile()``, composable ``checkpoint``), so checkpoints do not depend
on them: a run can resume with them switched on or off.
"""

from __future__ import annotations

from torch import nn

from forge.errors import ConfigError


def find_blocks(model: nn.Module, class_names: list[str] | None) -> list[nn.Module]:
    """The model's repeated blocks: FSDP units, checkpointed and compiled one by one.

    Args:
        model: The user's module.
        class_names: Module class names to use; None picks every child of an ``nn.ModuleList``
            (transformer blocks in most models).

    Example:
        >>> m = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.ReLU()]), nn.Linear(2, 1))
        >>> [type(b).__name__ for b in find_blocks(m, None)]
        ['Linear', 'ReLU']
        >>> [type(b).__name__ for b in find_blocks(m, ["Linear"])]
        ['Linear', 'Linear']
    """
    if class_names is not None:
        wanted = set(class_names)
        blocks = [m for m in model.modules() if type(m).__name__ in wanted and m is not model]
        if not blocks:
            found = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(
                f"strategy.block_classes={class_names} matches no module of the model; its "
                f"module classes are {', '.join(found)}."
            )
        return _outermost(blocks)
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            blocks.extend(module.children())
    return _outermost(blocks)


def _outermost(blocks: list[nn.Module]) -> list[nn.Module]:
    """Drop blocks nested inside other blocks (a unit cannot contain another one twice)."""
    inner = {id(sub) for b in blocks for sub in b.modules() if sub is not b}
    return [b for b in blocks if id(b) not in inner]


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in backward instead of keeping them.

    Uses the composable, non-reentrant ``checkpoint``: it works with FSDP2, DeepSpeed ZeRO-3's
    parameter hooks and torch.compile, and keeps parameter names unchanged.
    """
    from torch.distributed._composable import checkpoint

    for block in blocks:
        checkpoint(block)


def apply_compile(model: nn.Module, blocks: list[nn.Module]) -> None:
    """``torch.compile`` each block in place (or the whole model when it has no blocks).

    Per block: one small graph compiled once and reused by every layer, and sharding hooks left
    between blocks. In place (``nn.Module.compile``), so state-dict names do not change.
    """
    for block in blocks or [model]:
        block.compile()


def prepare(
    model: nn.Module,
    *,
    activation_checkpointing: bool,
    compile_model: bool,
    block_classes: list[str] | None,
) -> list[nn.Module]:
    """Apply AC, then compile (see the module docstring); returns the blocks found."""
    blocks = find_blocks(model, block_classes)
    if activation_checkpointing:
        if not blocks:
            raise ConfigError(
                "strategy.activation_checkpointing=true found no blocks in the model (no "
                "nn.ModuleList). Name them with strategy.block_classes=[MyBlock]."
            )
        apply_activation_checkpointing(blocks)
    if compile_model:
        apply_compile(model, blocks)
    return blocks
