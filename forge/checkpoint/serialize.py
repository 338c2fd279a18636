"""Bytes in and out of checkpoints without unpickling arbitrary code.

Tensors go through safetensors. Optimizer and other nested state (dicts, lists, numbers,
tensors) go through ``torch.save`` and come back only via ``torch.load(weights_only=True)``,
which refuses any pickle that would import or call code.

Serialization runs on background threads while the training thread keeps stepping, so the bulk
copies here never hold the GIL: tensor bytes are copied by torch ops (which release it) or by
``ctypes.memmove`` (a foreign call, which releases it too) into memory from ``torch.empty``,
whose pages are first touched by those copies. ``safetensors.torch.save`` and ``torch.save`` into
``io.BytesIO`` copy under the GIL, and so does ``bytearray(n)``, which zero-fills: the training
thread, which gives the GIL up in every torch op, then waits for each copy to end to take it
back (issue 16: stalls of up to 60 ms per 100 MB for safetensors, 125 ms in total per 200 MB for
``torch.save``).
"""

from __future__ import annotations

import ctypes
import io
import json
import struct
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from forge.checkpoint.storage import Buffer
from forge.errors import CheckpointError

# safetensors' dtype names, in the order its writer lays tensors out (largest dtype first, then
# by name), so the bytes written here are the bytes ``safetensors.torch.save`` would write (a test
# compares them). Other dtypes go through the library itself.
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.uint64: "U64",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float32: "F32",
    torch.uint32: "U32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint16: "U16",
    torch.int16: "I16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(_SAFETENSORS_DTYPES)}
_HEADER_ALIGN = 8  # safetensors pads its JSON header with spaces to a multiple of 8 bytes

# Below this many bytes a plain (GIL-holding) slice copy is cheaper than a foreign call.
_SMALL_COPY = 1 << 16


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> Buffer:
    """Serialize a flat name -> tensor map (e.g. a model state_dict) as safetensors.

    The result is the file ``safetensors.torch.save`` writes, built without holding the GIL for
    the tensor bytes. Tied weights (two names, one storage) are saved twice, as safetensors
    requires; load_state_dict re-ties them on load.

    Returns:
        The file's bytes: a memoryview of memory forge allocated (``bytes`` for dtypes forge
        leaves to the safetensors library).

    Example:
        >>> t = torch.ones(2)
        >>> bytes_to_tensors(tensors_to_bytes({"a": t, "b": t}))["b"].tolist()
        [1.0, 1.0]
    """
    tensors = {name: tensor.detach() for name, tensor in tensors.items()}
    if any(
        t.dtype not in _SAFETENSORS_DTYPES or t.layout != torch.strided for t in tensors.values()
    ):
        return _library_save(tensors)  # the library's own handling, or its own error
    order = sorted(tensors, key=lambda name: (_DTYPE_RANK[tensors[name].dtype], name))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        dtype = _SAFETENSORS_DTYPES[tensor.dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % _HEADER_ALIGN)
    start = 8 + len(head)
    flat = torch.empty(start + offset, dtype=torch.uint8)
    out = memoryview(flat.numpy())  # keeps ``flat`` alive
    out[:start] = struct.pack("<Q", len(head)) + head
    # Every tensor starts at a multiple of its element size (largest dtypes first, header padded
    # to 8), so each slice can be viewed as the tensor's own dtype and shape.
    for name in order:
        tensor = tensors[name]
        begin, end = header[name]["data_offsets"]
        if begin != end:
            flat[start + begin : start + end].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    return out


def _library_save(tensors: dict[str, torch.Tensor]) -> bytes:
    """``safetensors.torch.save``, after making tied tensors distinct (it refuses shared memory)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return st_save(out)


def bytes_to_tensors(data: Buffer) -> dict[str, torch.Tensor]:
    """Load a safetensors file's bytes (copied into ``bytes`` first when given another buffer)."""
    return st_load(data if isinstance(data, bytes) else bytes(data))


def object_to_bytes(obj: Any) -> Buffer:
    """``torch.save`` of ``obj`` (nested containers of tensors and numbers) into memory.

    Returns:
        The file's bytes, as a memoryview; the tensor records were copied without the GIL.

    Example:
        >>> bytes_to_object(object_to_bytes({"step": 3, "m": torch.zeros(2)}))["m"].tolist()
        [0.0, 0.0]
    """
    writer = _GilFreeWriter(_storage_bytes(obj) + (1 << 16))
    torch.save(obj, writer)
    return writer.getvalue()


def _storage_bytes(obj: Any) -> int:
    """The bytes of every distinct tensor storage in ``obj``: about what ``torch.save`` writes
    (an estimate for the buffer's first size; the writer grows past it if needed)."""
    seen: dict[int, int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            try:
                storage = item.untyped_storage()
            except (RuntimeError, NotImplementedError):  # a wrapper subclass: no estimate
                continue
            seen[storage.data_ptr()] = storage.nbytes() + 64  # records are 64-byte aligned
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sum(seen.values())


class _GilFreeWriter(io.RawIOBase):
    """A growable in-memory file whose large writes are copied by ``ctypes.memmove``.

    ``torch.save`` hands each tensor record to ``write`` as one read-only memoryview; the
    foreign call releases the GIL for the copy (and for the page faults of fresh memory).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self._buf = torch.empty(capacity, dtype=torch.uint8)
        self._view = memoryview(self._buf.numpy())
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        end = self._size + n
        if end > len(self._view):
            self._grow(end)
        if n < _SMALL_COPY:
            self._view[self._size : end] = view
        else:
            source = np.frombuffer(view, dtype=np.uint8).ctypes.data
            ctypes.memmove(self._buf.data_ptr() + self._size, source, n)
        self._size = end
        return n

    def _grow(self, needed: int) -> None:
        bigger = torch.empty(max(needed, 2 * len(self._view)), dtype=torch.uint8)
        ctypes.memmove(bigger.data_ptr(), self._buf.data_ptr(), self._size)
        self._buf, self._view = bigger, memoryview(bigger.numpy())

    def getvalue(self) -> memoryview:
        """The bytes written so far (a view: no copy)."""
        return self._view[: self._size]


def bytes_to_object(data: Buffer, name: str = "<bytes>") -> Any:
    """Load ``torch.save`` bytes with ``weights_only=True``; code-carrying pickles are refused."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError with its own text
        raise CheckpointError(
            f"{name}: refused to load. It is not plain tensor/number/container state "
            f"(torch.load with weights_only=True failed: {str(exc).splitlines()[0]}). "
            "A checkpoint that needs arbitrary pickle is not trusted by forge."
        ) from None
