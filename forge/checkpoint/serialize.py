"""Bytes in and out of checkpoints without unpickling arbitrary code.

Tensors go through safetensors. Optimizer and other nested state (dicts, lists, numbers,
tensors) go through ``torch.save`` and come back only via ``torch.load(weights_only=True)``,
which refuses any pickle that would import or call code.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from forge.errors import CheckpointError


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialize a flat name -> tensor map (e.g. a model state_dict) as safetensors.

    Tied weights (two names, one storage) are saved twice: safetensors refuses shared memory,
    and load_state_dict re-ties them on load.

    Example:
        >>> t = torch.ones(2)
        >>> bytes_to_tensors(tensors_to_bytes({"a": t, "b": t}))["b"].tolist()
        [1.0, 1.0]
    """
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return st_save(out)


def bytes_to_tensors(data: bytes) -> dict[str, torch.Tensor]:
    return st_load(data)


def object_to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def bytes_to_object(data: bytes, name: str = "<bytes>") -> Any:
    """Load ``torch.save`` bytes with ``weights_only=True``; code-carrying pickles are refused."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError with its own text
        raise CheckpointError(
            f"{name}: refused to load. It is not plain tensor/number/container state "
            f"(torch.load with weights_only=True failed: {str(exc).splitlines()[0]}). "
            "A checkpoint that needs arbitrary pickle is not trusted by forge."
        ) from None
