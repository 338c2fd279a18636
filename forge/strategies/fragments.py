"""forge's sharded checkpoint format: every tensor as flat fragments, keyed by name.

Sharded strategies (FSDP, DeepSpeed ZeRO) hold each parameter and each optimizer state as a
piece of its flattened tensor per worker. forge stores exactly that, so every rank writes only
what it holds and nothing is gathered on save::

    shard-00000-of-00002.safetensors   this rank's fragments (1-D tensors, safetensors)
    shard-00000-of-00002.json          their index: key -> [global shape, flat start, numel]

Keys are ``model/<fqn>`` (fp32 master weights and buffers) and ``optim/<state>/<fqn>``
(``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``...; scalar states such as ``step`` are stored
whole). Rank 0's index also carries the optimizer's param groups (by parameter name), tied
weight aliases and engine counters.

Why not torch.distributed.checkpoint: its ``.metadata`` is read with ``pickle.load``, while
forge only loads safetensors and ``torch.load(weights_only=True)``. Why not DeepSpeed's own
files: they are pickles too, and only reshard after an offline conversion. Flat fragments keep
both safe and make resharding plain arithmetic: any rank of any strategy on any world size
asks :class:`StateReader` for the range it needs, and DDP checkpoints (``model.safetensors`` +
``optim.pt``) are read through the same interface.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from forge.checkpoint.serialize import bytes_to_object, bytes_to_tensors, tensors_to_bytes
from forge.checkpoint.storage import StorageOptions
from forge.checkpoint.store import CommittedCheckpoint, open_checkpoint
from forge.errors import CheckpointError

FORMAT = "forge-sharded/1"
MODEL_FILE = "model.safetensors"  # DDP's full-state files
OPTIM_FILE = "optim.pt"
_SHARD = re.compile(r"^shard-(\d{5})-of-(\d{5})\.json$")


def shard_name(rank: int, world_size: int, suffix: str = "safetensors") -> str:
    """The file name of ``rank``'s shard.

    Example:
        >>> shard_name(1, 4)
        'shard-00001-of-00004.safetensors'
    """
    return f"shard-{rank:05d}-of-{world_size:05d}.{suffix}"


def is_sharded(ckpt: CommittedCheckpoint) -> bool:
    """True if ``ckpt`` is in this module's format (False for DDP's full-state files)."""
    return any(_SHARD.match(name) for name in ckpt.manifest.files)


def jsonable(value: Any) -> Any:
    """Optimizer hyper-parameters as JSON (tensors become numbers; other objects are dropped).

    Example:
        >>> jsonable({"lr": torch.tensor(0.5), "betas": (0.9, 0.99), "foreach": None})
        {'lr': 0.5, 'betas': [0.9, 0.99], 'foreach': None}
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, dict):
        out = {k: jsonable(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _DROP}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _DROP


_DROP = object()


def tied_names(module: torch.nn.Module) -> dict[str, str]:
    """``{alias: name}`` for state-dict entries that are a parameter ``named_parameters`` lists
    under another name (tied weights, e.g. a language model's head and embedding).

    Example:
        >>> m = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
        >>> m["b"].weight = m["a"].weight
        >>> tied_names(m)
        {'b.weight': 'a.weight'}
    """
    first = {id(p): name for name, p in module.named_parameters()}
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        canonical = first.get(id(value))
        if canonical is not None and canonical != name:
            out[name] = canonical
    return out


class ShardWriter:
    """Collects one rank's fragments; host copies are taken at :meth:`add` time.

    Example:
        >>> w = ShardWriter(rank=0, world_size=1)
        >>> w.add("model/w", torch.arange(6.0).reshape(2, 3)[1], shape=(2, 3), start=3)
        >>> sorted(w.files())
        ['shard-00000-of-00001.json', 'shard-00000-of-00001.safetensors']
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.tensors: dict[str, torch.Tensor] = {}
        self.index: dict[str, list[Any]] = {}
        self.meta: dict[str, Any] = {}

    def add(self, key: str, local: torch.Tensor, shape: Iterable[int], start: int) -> None:
        """Record elements ``[start, start + local.numel())`` of the flattened tensor ``key``."""
        if local.numel() == 0:
            return
        if key in self.index:
            raise CheckpointError(f"internal error: {key} added twice to one shard")
        self.tensors[key] = local.detach().reshape(-1).to("cpu", copy=True)
        self.index[key] = [list(shape), int(start), int(local.numel())]

    def add_whole(self, key: str, tensor: torch.Tensor) -> None:
        """Record a whole tensor (a buffer, a scalar ``step``); one rank should own it."""
        self.add(key, tensor, tuple(tensor.shape), 0)

    def files(self) -> dict[str, Any]:
        """``{name: zero-arg callable -> bytes}``; safe to run later, in the background."""
        tensors, header = self.tensors, {"format": FORMAT, "index": self.index, **self.meta}
        return {
            shard_name(self.rank, self.world_size): lambda: tensors_to_bytes(tensors),
            shard_name(self.rank, self.world_size, "json"): lambda: json.dumps(header).encode(),
        }


class StateReader:
    """Model and optimizer state of a committed checkpoint, by key and flat range.

    Reads forge's sharded format and DDP's full-state files alike, so every strategy can resume
    from every checkpoint. A shard is fetched only when a requested range overlaps it, and then
    memory-mapped (remote ones are downloaded into a temporary folder first): a rank holds in
    memory only the ranges it reads, not whole shards, when it reshards or assembles full
    weights (ZeRO-1/2). :meth:`close` (or the end of a ``with`` block, or garbage collection)
    releases the maps and deletes downloaded files.

    Args:
        ckpt: The checkpoint.
        param_names: The model's parameter names in optimizer order; needed to read DDP's
            ``optim.pt``, which numbers parameters instead of naming them.
        aliases: The live model's tied weights, ``{alias: name}`` (see :func:`tied_names`), so
            a tied weight is found under whichever of its names the writer used.
    """

    def __init__(
        self,
        ckpt: CommittedCheckpoint,
        param_names: list[str] | None = None,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.ckpt = ckpt
        self.aliases = dict(aliases or {})
        self.meta: dict[str, Any] = {}
        # key -> [(file or None, start, numel)]; file None: already in self._loaded
        self.where: dict[str, list[tuple[str | None, int, int]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        # Full-state files (DDP's) are read whole; shards are memory-mapped and sliced, so a
        # rank materializes only the ranges it asks for, however many shards it overlaps.
        self._loaded: dict[str, torch.Tensor] = {}
        self._shards: dict[str, Any] = {}  # file -> safetensors safe_open handle
        self._workdir: str | None = None  # downloaded shards of a remote checkpoint
        self._optim_keys: dict[str, list[str]] | None = None
        if is_sharded(ckpt):
            self._index_shards()
        elif MODEL_FILE in ckpt.manifest.files:
            self._read_full(param_names)
        else:
            raise CheckpointError(
                f"{ckpt.uri} holds no model state forge can read (neither {MODEL_FILE} nor "
                f"shard-*-of-*.json; strategy {ckpt.manifest.strategy!r}). Resume from a "
                "checkpoint written by forge.train."
            )

    # -- opening ---------------------------------------------------------------------------

    def _index_shards(self) -> None:
        for name in sorted(self.ckpt.manifest.files):
            if not _SHARD.match(name):
                continue
            header = json.loads(self.ckpt.read(name))
            if header.get("format") != FORMAT:
                raise CheckpointError(f"{self.ckpt.uri}/{name}: unknown format {header!r:.80}")
            data_file = name[: -len("json")] + "safetensors"
            for key, (shape, start, numel) in header.pop("index").items():
                self.shapes[key] = tuple(shape)
                self.where.setdefault(key, []).append((data_file, start, numel))
            header.pop("format")
            for k, v in header.items():
                self.meta.setdefault(k, v)

    def _read_full(self, param_names: list[str] | None) -> None:
        model = bytes_to_tensors(self.ckpt.read(MODEL_FILE))
        for name, tensor in model.items():
            self._put(f"model/{name}", tensor)
        if OPTIM_FILE not in self.ckpt.manifest.files or param_names is None:
            return
        optim = bytes_to_object(self.ckpt.read(OPTIM_FILE), OPTIM_FILE)
        if isinstance(optim, list):  # Lightning with several optimizers: not mappable by name
            return
        groups = []
        for group in optim.get("param_groups", []):
            ids = group.get("params", [])
            if any(i >= len(param_names) for i in ids):
                raise CheckpointError(
                    f"{self.ckpt.uri}/{OPTIM_FILE} has state for {max(ids) + 1} parameters but "
                    f"the model has {len(param_names)}: it was written for another model."
                )
            groups.append({**jsonable(group), "params": [param_names[i] for i in ids]})
        self.meta["param_groups"] = groups
        for idx, state in optim.get("state", {}).items():
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                self._put(f"optim/{key}/{param_names[idx]}", value)

    def _put(self, key: str, tensor: torch.Tensor) -> None:
        self.shapes[key] = tuple(tensor.shape)
        self._loaded[key] = tensor.reshape(-1)
        self.where[key] = [(None, 0, tensor.numel())]

    def _make_workdir(self) -> str:
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="forge-shards-")
            weakref.finalize(self, shutil.rmtree, self._workdir, True)
        return self._workdir

    def close(self) -> None:
        """Drop the memory maps and any downloaded shard files (also done when collected)."""
        self._shards.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> StateReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------

    def resolve(self, key: str) -> str:
        """``key`` itself, or the stored name of a weight tied to it (``head.weight``...)."""
        if key in self.where:
            return key
        kind, _, rest = key.partition("/")
        prefix, _, fqn = rest.rpartition("/") if kind == "optim" else ("", "", rest)
        for name in self._tie_group(fqn):
            candidate = "/".join(p for p in (kind, prefix, name) if p)
            if candidate in self.where:
                return candidate
        return key

    def _tie_group(self, fqn: str) -> list[str]:
        ties = {**self.meta.get("aliases", {}), **self.aliases}  # alias -> canonical name
        canonical = ties.get(fqn, fqn)
        return [canonical, *(a for a, c in ties.items() if c == canonical)]

    def __contains__(self, key: str) -> bool:
        return self.resolve(key) in self.where

    def keys(self, prefix: str = "") -> list[str]:
        """Stored keys starting with ``prefix`` (aliases not included)."""
        return sorted(k for k in self.where if k.startswith(prefix))

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes[self.resolve(key)]

    def read(self, key: str, start: int = 0, numel: int | None = None) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the flattened tensor ``key`` (1-D)."""
        key = self.resolve(key)
        if key not in self.where:
            raise CheckpointError(
                f"{self.ckpt.uri} has no {key!r} (the model or optimizer differs from the one "
                "that wrote the checkpoint; e.g. another recipe.params or optim.name)."
            )
        total = math.prod(self.shapes[key])
        numel = total - start if numel is None else numel
        if numel == 0:
            return torch.empty(0)
        out: torch.Tensor | None = None
        pieces = []
        for file, f_start, f_numel in self.where[key]:
            lo, hi = max(start, f_start), min(start + numel, f_start + f_numel)
            if lo >= hi:
                continue
            frag = self._slice(file, key, lo - f_start, hi - f_start)
            if out is None:
                out = torch.empty(numel, dtype=frag.dtype)
            out[lo - start : hi - start] = frag
            pieces.append((lo, hi))
        covered, end = 0, start  # length of the union of the pieces (replicas may overlap)
        for lo, hi in sorted(pieces):
            covered += max(0, hi - max(lo, end))
            end = max(end, hi)
        if covered != numel or out is None:
            raise CheckpointError(
                f"{self.ckpt.uri}: {key}[{start}:{start + numel}] is only partly stored "
                f"({covered} of {numel} elements); a shard is missing."
            )
        return out

    def full(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` in its saved shape."""
        return self.read(key).reshape(self.shape(key))

    def _slice(self, file: str | None, key: str, lo: int, hi: int) -> torch.Tensor:
        """Elements ``[lo, hi)`` of the fragment of ``key`` stored in ``file``."""
        if file is None:
            return self._loaded[key][lo:hi]
        if file not in self._shards:
            from safetensors import safe_open

            path = self.ckpt.local_file(file, self._make_workdir)
            try:
                self._shards[file] = safe_open(path, framework="pt", device="cpu")
            except Exception as exc:  # verified bytes that safetensors rejects: a bad writer
                raise CheckpointError(f"{self.ckpt.uri}/{file} is not safetensors: {exc}") from None
        return self._shards[file].get_slice(key)[lo:hi]

    # -- optimizer hyper-parameters ----------------------------------------------------------

    def optim_keys(self, fqn: str) -> list[str]:
        """The optimizer state names stored for parameter ``fqn`` (``exp_avg``, ``step``...)."""
        if self._optim_keys is None:
            self._optim_keys = {}
            for key in self.where:
                kind, _, rest = key.partition("/")
                if kind == "optim":
                    state, _, name = rest.partition("/")
                    self._optim_keys.setdefault(name, []).append(state)
        fqn = self.resolve(f"model/{fqn}").split("/", 1)[1]
        return sorted(self._optim_keys.get(fqn, []))

    def apply_param_groups(self, param_groups: list[dict[str, Any]]) -> None:
        """Set lr, betas, weight decay... of the live param groups from the checkpoint's."""
        saved = self.meta.get("param_groups")
        if not saved:
            return
        if len(saved) != len(param_groups):
            raise CheckpointError(
                f"{self.ckpt.uri} has {len(saved)} optimizer param groups, the optimizer here "
                f"has {len(param_groups)}."
            )
        for live, old in zip(param_groups, saved, strict=True):
            for name, value in old.items():
                if name == "params" or name not in live:
                    continue
                live[name] = tuple(value) if isinstance(live[name], tuple) else value


def consolidate(uri: str, options: StorageOptions | None = None) -> dict[str, torch.Tensor]:
    """One full-precision state dict from any forge checkpoint, for export and evaluation.

    Works for every strategy and world size: DDP's ``model.safetensors`` is returned as is;
    sharded checkpoints are assembled from every rank's fragments (fp32 master weights, tied
    weights under each of their names).

    Args:
        uri: A committed checkpoint folder (``<run>/checkpoints/step_00000100``).
        options: How to reach remote storage (endpoint, region, retries); None: defaults.

    Returns:
        ``{name: tensor}``, loadable with ``model.load_state_dict``.

    Example:
        >>> from forge.checkpoint.store import CheckpointStore
        >>> w = ShardWriter(0, 1)
        >>> w.add_whole("model/w", torch.ones(2, 2))
        >>> files = {n: f() for n, f in w.files().items()}
        >>> ckpt = CheckpointStore("memory://doc/consolidate").save(1, files, strategy="fsdp")
        >>> consolidate(ckpt.uri)["w"].shape
        torch.Size([2, 2])
    """
    reader = StateReader(open_checkpoint(uri, options=options))
    out = {key[len("model/") :]: reader.full(key) for key in reader.keys("model/")}
    for alias, target in reader.meta.get("aliases", {}).items():
        out[alias] = out[target]
    return out
