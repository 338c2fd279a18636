"""The driver's pass over a run's data, before any worker starts.

For a file source (``data.source``): list the files, stream every row once (pyarrow, one batch
at a time) through the contract check and the reference profile, count the train/val split, and
refuse bad data in one paragraph (missing/empty/unreadable files, a missing column, a label with
one class, contract violations). For a recipe's in-memory data: build its datasets here once,
hash their bytes and profile them. Either way the result carries the fingerprint (for
``run.json`` and every checkpoint manifest) and ``data_profile.json``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from forge.checkpoint.storage import StorageOptions
from forge.config.specs import DataSpec, RunSpec
from forge.data import profile as profiles
from forge.data.contract import Contract, ContractChecker, load_contract, violation_table
from forge.data.fingerprint import files_fingerprint, memory_fingerprint
from forge.data.source import FileSource, read_batches, resolve
from forge.data.split import val_mask
from forge.errors import ConfigError

log = logging.getLogger(__name__)

MAX_CATEGORIES = 1000  # one-hot width guard for categorical features


@dataclass(frozen=True)
class TableInfo:
    """A checked file source, as the workers and the recipe see it (shipped in the LaunchPlan).

    Attributes:
        source / val: The resolved training (and validation) files.
        features: Feature columns in model order: ``numeric`` first, then ``categorical``.
        numeric: Numeric features; ``means``/``stds`` of each from the training profile.
        categorical: Categorical features and their categories (training data, by frequency).
        label: The label column; ``classes`` its class keys (sorted), index = class id.
        train_rows / val_rows: Rows of each split after the contract's ``drop``.
        val_fraction / split_key / split_seed: The hash split of ``source`` (when no ``val``).
        contract / drop: The contract, and whether failing rows are dropped on the workers.
    """

    source: FileSource
    val: FileSource | None
    numeric: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...]
    label: str | None
    classes: tuple[str, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    train_rows: int
    val_rows: int
    val_fraction: float = 0.0
    split_key: str | None = None
    split_seed: int = 0
    contract: Contract | None = None
    drop: bool = False

    @property
    def features(self) -> tuple[str, ...]:
        return self.numeric + tuple(name for name, _ in self.categorical)

    @property
    def has_val(self) -> bool:
        return self.val_rows > 0

    @property
    def width(self) -> int:
        """Width of :meth:`encode`'s feature matrix (numeric + one-hot columns)."""
        return len(self.numeric) + sum(len(cats) for _, cats in self.categorical)

    def feature_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std per encoded column (0 and 1 for one-hot columns), float32."""
        onehot = self.width - len(self.numeric)
        mean = np.concatenate([np.asarray(self.means, np.float32), np.zeros(onehot, np.float32)])
        std = np.concatenate([np.asarray(self.stds, np.float32), np.ones(onehot, np.float32)])
        return mean, std

    def encode(self, batch: pd.DataFrame | Mapping[str, Any]) -> tuple[Any, Any]:
        """A batch as tensors: features ``(B, width)`` float32 (numeric values raw, NaN for
        nulls; categoricals one-hot, all zeros for null or unseen), labels ``(B,)`` int64
        (-100 for a null or unknown class).

        ``batch`` is a DataFrame or Ray Data's numpy batch (a dict of column arrays). This runs
        on the training thread for every batch, so it stays in numpy: the pandas version
        (``pd.Categorical``, ``apply(to_numeric)``, per-row label strings) took 3.5 ms per
        256 rows, as long as the tabular MLP's whole training step.
        """
        import torch

        first = self.features[0] if self.features else self.label
        n = len(batch[first]) if first is not None else len(batch)
        x = np.zeros((n, self.width), np.float32)
        for j, name in enumerate(self.numeric):
            x[:, j] = _as_float(batch[name])
        col = len(self.numeric)
        for name, cats in self.categorical:
            index = self._category_index[name]
            codes = np.fromiter(
                (index.get(_key(v), -1) for v in _as_objects(batch[name])), np.int64, count=n
            )
            seen = np.nonzero(codes >= 0)[0]
            x[seen, col + codes[seen]] = 1.0
            col += len(cats)
        y = None
        if self.label is not None:
            y = torch.from_numpy(self._label_ids(batch[self.label], n))
        return torch.from_numpy(x), y

    @functools.cached_property
    def _category_index(self) -> dict[str, dict[str, int]]:
        return {name: {c: i for i, c in enumerate(cats)} for name, cats in self.categorical}

    @functools.cached_property
    def _class_index(self) -> tuple[dict[str, int], dict[float, int]]:
        """Class ids by key, and by numeric value for keys that are numbers (``label_keys``
        writes an integral number as ``"1"`` and any other as ``str(float)``)."""
        by_key = {key: i for i, key in enumerate(self.classes)}
        by_value = {}
        for key, i in by_key.items():
            try:
                by_value[float(key)] = i
            except ValueError:
                pass
        return by_key, by_value

    def _label_ids(self, column: Any, n: int) -> np.ndarray:
        by_key, by_value = self._class_index
        values = column.to_numpy() if isinstance(column, pd.Series) else np.asarray(column)
        if values.dtype.kind in "iuf":  # label_keys' numeric branch, without the strings
            floats = values.astype(np.float64)
            return np.fromiter((by_value.get(v, -100) for v in floats.tolist()), np.int64, n)
        return np.fromiter((by_key.get(_key(v), -100) for v in values.tolist()), np.int64, n)


def _as_float(column: Any) -> np.ndarray:
    """A numeric feature as float32 with NaN for nulls (non-numbers become NaN, as
    ``pd.to_numeric(errors="coerce")``)."""
    if isinstance(column, pd.Series):
        if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
            return column.to_numpy(np.float32, na_value=np.nan)
        return pd.to_numeric(column, errors="coerce").to_numpy(np.float32, na_value=np.nan)
    values = np.asarray(column)
    if values.dtype.kind in "iuf":
        return values.astype(np.float32)
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(np.float32, na_value=np.nan)


def _as_objects(column: Any) -> list[Any]:
    if isinstance(column, pd.Series):
        return column.tolist()
    return np.asarray(column, dtype=object).tolist()


def _key(value: Any) -> str | None:
    """A category or label value as its key: None for a null, else ``str(value)``."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return None
    return str(value)


@dataclass
class PreparedData:
    """What the driver learned about the run's data."""

    fingerprint: dict[str, Any]
    profile: dict[str, Any]
    table: TableInfo | None = None
    notes: list[str] = field(default_factory=list)


class _Pass:
    """One streaming pass over a file source: contract, drop, split; yields train/val parts."""

    def __init__(self, data: DataSpec, source: FileSource, val: FileSource | None) -> None:
        self.data, self.source, self.val = data, source, val
        self.required = [c for c in [*(data.columns or []), data.label, data.split_key] if c]

    def frames(self, which: FileSource, key: str) -> Iterator[pd.DataFrame]:
        return read_batches(which, require=self.required, key=key)


def _bad_labels(frame: pd.DataFrame, label: str) -> int:
    return int(frame[label].isna().sum())


def prepare_files(
    data: DataSpec, options: StorageOptions, world_size: int = 1, check_batches: bool = True
) -> PreparedData:
    """Check and profile a file source (``data.source``) on the driver.

    Raises:
        ConfigError: Bad source, missing column, one-class label, too few rows for a batch per
            worker, or contract violations with ``data.on_violation=fail`` (all of them, as one
            table).
    """
    assert data.source is not None
    source = resolve(data.source, data.format, options)
    val = (
        resolve(data.val_source, data.format, options, "data.val_source")
        if data.val_source
        else None
    )
    contract = load_contract(data.contract, options) if data.contract is not None else None
    drop = contract is not None and data.on_violation == "drop"
    checker = ContractChecker(contract, data.label, drop=drop) if contract else None
    passes = _Pass(data, source, val)
    label = data.label
    builder = profiles.ProfileBuilder(label=label, seed=data.split_seed)
    counts = {"rows": 0, "train": 0, "val": 0, "dropped": 0, "checked": 0, "null_labels": 0}
    feature_names: list[str] | None = None

    def select(frame: pd.DataFrame) -> pd.DataFrame:
        nonlocal feature_names
        if feature_names is None:
            feature_names = (
                list(data.columns) if data.columns else [c for c in frame.columns if c != label]
            )
        keep = [*feature_names, *([label] if label else [])]
        return frame[keep]

    def split_train(frame: pd.DataFrame, failed: np.ndarray | None) -> pd.DataFrame:
        if failed is not None and drop:
            frame = frame[~failed]
        if data.val_fraction:
            frame = frame[~val_mask(frame, data.val_fraction, data.split_key, data.split_seed)]
        return frame

    for frame in passes.frames(source, "data.source"):
        counts["rows"] += len(frame)
        failed = None
        if checker is not None and (
            data.check_max_rows is None or counts["checked"] < data.check_max_rows
        ):
            if data.check_max_rows is not None:
                frame_checked = frame.iloc[: data.check_max_rows - counts["checked"]]
            else:
                frame_checked = frame
            counts["checked"] += len(frame_checked)
            failed = checker.update(frame_checked)
            if len(failed) < len(frame):  # past the checked rows: drop still applies there
                rest = checker.row_failures(frame.iloc[len(failed) :], record=False)
                failed = np.concatenate([failed, rest])
        elif checker is not None and drop:
            failed = checker.row_failures(frame, record=False)
        if failed is not None and drop:
            counts["dropped"] += int(failed.sum())
        train = split_train(frame, failed)
        if label:
            counts["null_labels"] += _bad_labels(train, label)
        counts["val"] += (
            len(frame) - (int(failed.sum()) if failed is not None and drop else 0) - len(train)
        )
        counts["train"] += len(train)
        builder.update(select(train))
    val_rows = counts["val"]
    val_fp = None
    if val is not None:
        val_total = 0
        for frame in passes.frames(val, "data.val_source"):
            val_total += len(frame)
            failed = checker.update(frame) if checker is not None else None
            kept = frame[~failed] if failed is not None and drop else frame
            if label:
                counts["null_labels"] += _bad_labels(kept, label)
            val_rows += len(kept)
        val_fp = files_fingerprint(val.uri, val.files, val_total, val.format)

    notes: list[str] = []
    if checker is not None:
        violations = checker.finish()
        scope = (
            f"the first {counts['checked']} of {counts['rows']} rows"
            if data.check_max_rows is not None and counts["checked"] < counts["rows"]
            else "every row"
        )
        if violations:
            table = violation_table(violations)
            blocking = [v for v in violations if not v.droppable] if drop else []
            if data.on_violation == "fail" or blocking:
                why = (
                    ""
                    if data.on_violation == "fail"
                    else " (data.on_violation=drop removes rows only for per-row checks; these "
                    "are about the whole table or a column's type)"
                )
                raise ConfigError(
                    f"data.contract: {len(blocking or violations)} violation(s) in "
                    f"data.source={data.source} (checked {scope}){why}:\n"
                    f"{violation_table(blocking or violations)}\n"
                    "Fix the data, relax the contract, or set data.on_violation=drop (removes "
                    "the rows failing per-row checks) or data.on_violation=warn."
                )
            if data.on_violation == "warn":
                notes.append(
                    f"data.contract: {len(violations)} violation(s), training anyway "
                    f"(data.on_violation=warn):\n{table}"
                )
            else:
                notes.append(
                    f"data.contract: dropped {counts['dropped']} of {counts['rows']} rows "
                    f"failing per-row checks (data.on_violation=drop):\n{table}"
                )
        else:
            notes.append(f"data.contract: passed ({scope}).")
    if counts["rows"] == 0:
        raise ConfigError(
            f"data.source={data.source}: its {len(source.files)} file(s) hold no rows. Point it "
            "at data with rows."
        )
    if counts["train"] == 0:
        raise ConfigError(
            f"data.source={data.source}: no training rows remain (of {counts['rows']}: "
            f"{counts['dropped']} dropped by the contract, the rest held out by "
            f"data.val_fraction={data.val_fraction}). Lower data.val_fraction or fix the data."
        )
    if label and counts["null_labels"]:
        raise ConfigError(
            f"data.label={label}: {counts['null_labels']} row(s) have no label. Remove them, or "
            f"add a contract with columns.{label}.nullable: false and data.on_violation=drop."
        )
    fingerprint = files_fingerprint(source.uri, source.files, counts["rows"], source.format, val_fp)
    frames_again = lambda: (
        select(split_train(f, checker.row_failures(f, record=False) if drop else None))
        for f in passes.frames(source, "data.source")
    )
    profile = builder.finish(
        source=source.uri, fingerprint=fingerprint["sha256"], rescan=frames_again
    )
    if label:
        classes = sorted(profile["label_distribution"] or {})
        if len(classes) < 2:
            raise ConfigError(
                f"data.label={label} has a single class ({classes[0] if classes else 'none'}) "
                f"in the {counts['train']} training rows of data.source={data.source}; a "
                "classifier needs at least two. Check the label column and the data."
            )
    else:
        classes = []
    per_worker = counts["train"] // world_size
    if check_batches and per_worker < data.batch_size:
        raise ConfigError(
            f"data.source={data.source} has {counts['train']} training rows: {per_worker} per "
            f"worker, fewer than data.batch_size={data.batch_size}, so no full batch exists. "
            "Lower data.batch_size or scaling.num_workers."
        )
    numeric, categorical = [], []
    for name in feature_names or []:
        doc = profile["columns"][name]
        if doc["kind"] == "numeric":
            numeric.append(name)
        else:
            cats = tuple(list(doc["counts"])[:MAX_CATEGORIES])
            categorical.append((name, cats))
    means = tuple(float(profile["columns"][n]["mean"] or 0.0) for n in numeric)
    stds = tuple(float(profile["columns"][n]["std"] or 1.0) or 1.0 for n in numeric)
    table = TableInfo(
        source=source,
        val=val,
        numeric=tuple(numeric),
        categorical=tuple(categorical),
        label=label,
        classes=tuple(classes),
        means=means,
        stds=stds,
        train_rows=counts["train"],
        val_rows=val_rows,
        val_fraction=data.val_fraction,
        split_key=data.split_key,
        split_seed=data.split_seed,
        contract=contract,
        drop=drop,
    )
    notes.insert(
        0,
        f"data: {source.uri} ({len(source.files)} {source.format} file(s), {counts['rows']} "
        f"rows): {counts['train']} train, {val_rows} val; fingerprint "
        f"{fingerprint['sha256'][:12]}",
    )
    return PreparedData(fingerprint, profile, table, notes)


def _tensor_columns(batch: Any) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """A collated batch of in-memory samples as named feature columns and an optional label.

    A trailing 1-D integer tensor is the label; a feature of at most 64 values per sample
    becomes one column per value (``x0[0]``, ...), a larger one two columns (``x0.mean``,
    ``x0.std``) so a profile stays readable for images and token windows.
    """
    import torch

    parts = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    label = None
    if (
        len(parts) > 1
        and isinstance(parts[-1], torch.Tensor)
        and parts[-1].dim() == 1
        and not parts[-1].is_floating_point()
    ):
        label = parts.pop().numpy()
    columns: dict[str, np.ndarray] = {}
    for i, part in enumerate(parts):
        if not isinstance(part, torch.Tensor):
            continue
        flat = part.reshape(len(part), -1).double().numpy()
        if flat.shape[1] <= 64:
            for j in range(flat.shape[1]):
                columns[f"x{i}[{j}]"] = flat[:, j]
        else:
            columns[f"x{i}.mean"] = flat.mean(axis=1)
            columns[f"x{i}.std"] = flat.std(axis=1)
    return columns, label


def _hash_batch(digest: Any, batch: Any) -> None:
    import torch

    parts = list(batch) if isinstance(batch, (tuple, list)) else [batch]
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.contiguous().cpu().numpy().tobytes())
        else:
            digest.update(repr(part).encode())


def profile_dataset(dataset: Any, source: str, collate_fn: Callable | None = None) -> PreparedData:
    """Fingerprint and profile a recipe's in-memory (map-style) training dataset.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 1]))
        >>> p = profile_dataset(data, "recipe:doc")
        >>> p.profile["rows"], sorted(p.profile["columns"]), p.profile["label_distribution"]
        (3, ['x0[0]', 'x0[1]'], {'0': 1, '1': 2})
    """
    from torch.utils.data import DataLoader

    digest = hashlib.sha256()
    builder: profiles.ProfileBuilder | None = None
    rows = 0
    loader = DataLoader(dataset, batch_size=4096, shuffle=False, collate_fn=collate_fn)
    for batch in loader:
        _hash_batch(digest, batch)
        columns, label = _tensor_columns(batch)
        frame = pd.DataFrame(columns)
        if label is not None:
            frame["label"] = label
        if builder is None:
            builder = profiles.ProfileBuilder(label="label" if label is not None else None)
        builder.update(frame)
        rows += len(frame)
    builder = builder or profiles.ProfileBuilder()
    fingerprint = memory_fingerprint(source, digest.hexdigest(), rows)
    profile = builder.finish(source=source, fingerprint=fingerprint["sha256"])
    return PreparedData(fingerprint, profile, None, [])


def prepare_recipe(spec: RunSpec) -> PreparedData:
    """Build the recipe's training data on the driver once, to fingerprint and profile it."""
    from forge.recipe import build_params, import_recipe_module

    mod = import_recipe_module(spec.recipe.module)
    params = build_params(mod, spec.recipe.params)
    source = f"recipe:{spec.recipe.name}"
    # A recipe's own train_data(params) gives the data without the model: the driver must not
    # build a model it never trains (memory, time, and whatever else build() does).
    if callable(getattr(mod, "train_data", None)):
        data = mod.train_data(params)
        if data is None:  # nothing in memory to describe
            return PreparedData(memory_fingerprint(source, "", 0), {}, None, [])
        return profile_dataset(data, source, getattr(mod, "collate_fn", None))
    log.info(
        "recipe %s has no train_data(params): its build() runs on the driver once, to profile "
        "the training data; define train_data(params) to spare the driver the model.",
        spec.recipe.name,
    )
    if spec.recipe.kind == "lightning":
        _, datamodule = mod.build_lightning(params)
        if datamodule is None:
            return PreparedData(memory_fingerprint(source, "", 0), {}, None, [])
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        return profile_dataset(loader.dataset, source, loader.collate_fn)
    recipe = mod.build(params)
    if recipe.train_data is None:  # nothing in memory to describe
        return PreparedData(memory_fingerprint(source, "", 0), {}, None, [])
    return profile_dataset(recipe.train_data, source, recipe.collate_fn)


def prepare(spec: RunSpec) -> PreparedData:
    """The data pass for a run: a file source when ``data.source`` is set, else the recipe's."""
    if spec.data.source is not None:
        from forge.data.recipes import check_file_source
        from forge.recipe import import_recipe_module

        mod = import_recipe_module(spec.recipe.module)
        check_file_source(mod, spec.recipe.module, spec.recipe.kind)
        prepared = prepare_files(
            spec.data, StorageOptions.from_spec(spec.storage), spec.scaling.num_workers
        )
        if spec.checkpoint.monitor is not None and not prepared.table.has_val:
            raise ConfigError(
                f"checkpoint.monitor={spec.checkpoint.monitor} ranks checkpoints by a validation "
                f"metric, but data.source={spec.data.source} has no validation rows. Set "
                "data.val_fraction (e.g. 0.1) or data.val_source, or remove checkpoint.monitor "
                "(checkpoint.monitor=null)."
            )
        return prepared
    return prepare_recipe(spec)
