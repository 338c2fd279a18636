"""Data contracts: what a dataset must look like before any worker trains on it.

A contract (``data.contract``: inline in the config, or a YAML file) lists per column a
``dtype`` (``float``, ``int``, ``bool``, ``string``, ``datetime``), ``nullable`` or a
``max_null_fraction``, ``min``/``max``, allowed ``categories`` and ``unique``; and for the table
``min_rows``, ``label_balance`` (every class's share within ``[min, max]``) and
``no_duplicate_rows``::

    columns:
      age:    {dtype: float, min: 0, max: 120, max_null_fraction: 0.05}
      city:   {dtype: string, categories: [paris, lyon, nice]}
      id:     {dtype: int, nullable: false, unique: true}
    table:
      min_rows: 1000
      label_balance: {min: 0.05, max: 0.95}
      no_duplicate_rows: true

The per-row checks (nulls, ranges, categories) run through pandera on each batch; the checks that
need the whole table (dtype, null fraction, uniqueness across batches, duplicates, row count,
label balance) are accumulated here. :meth:`ContractChecker.finish` returns every violation at
once; :func:`violation_table` prints them as one table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from forge.errors import ConfigError

DType = Literal["float", "int", "bool", "string", "datetime"]
MAX_EXAMPLES = 3
EXAMPLE_CHARS = 24  # examples are cut short: enough to recognize a value, not a whole record


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ColumnContract(_Strict):
    dtype: DType | None = None
    nullable: bool = True
    max_null_fraction: float | None = Field(None, ge=0, le=1)
    min: float | None = None
    max: float | None = None
    categories: list[str | int | float | bool] | None = None
    unique: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ColumnContract:
        if self.max_null_fraction is not None and not self.nullable:
            raise ValueError("nullable: false contradicts max_null_fraction; keep one")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self


class LabelBalance(_Strict):
    min: float = Field(0.0, ge=0, le=1)
    max: float = Field(1.0, ge=0, le=1)


class TableContract(_Strict):
    min_rows: int | None = Field(None, ge=0)
    label_balance: LabelBalance | None = None
    no_duplicate_rows: bool = False


class Contract(_Strict):
    """A validated data contract (see the module docstring for the YAML form)."""

    columns: dict[str, ColumnContract] = Field(default_factory=dict)
    table: TableContract = TableContract()


def load_contract(value: str | dict[str, Any], options: Any = None) -> Contract:
    """A :class:`Contract` from an inline mapping or a YAML file (local path or URI).

    Raises:
        ConfigError: No such file, bad YAML, or an invalid contract (naming the key).

    Example:
        >>> load_contract({"columns": {"x": {"dtype": "float", "min": 0}}}).columns["x"].min
        0.0
    """
    import yaml

    where = "data.contract"
    if isinstance(value, str):
        from forge.checkpoint import storage

        where = f"data.contract={value}"
        try:
            text = storage.read_bytes(storage.normalize(value), options).decode()
        except FileNotFoundError:
            raise ConfigError(
                f"{where}: no such file. Give a YAML contract file (python -m forge "
                "infer-contract drafts one), or an inline mapping."
            ) from None
        try:
            value = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML ({exc}).") from None
    try:
        return Contract.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(
            f"{where}: {loc}: {err['msg']}. Allowed per column: dtype (float|int|bool|string|"
            "datetime), nullable, max_null_fraction, min, max, categories, unique; under "
            "table: min_rows, label_balance {min, max}, no_duplicate_rows."
        ) from None


@dataclass
class Violation:
    """One failed check: ``failing_rows`` is None for a table-level check."""

    column: str
    check: str
    failing_rows: int | None
    examples: list[str] = field(default_factory=list)
    droppable: bool = False  # a per-row check: data.on_violation=drop removes those rows


def _example(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 1] + "…"


def dtype_family(series: pd.Series) -> str:
    """The contract's name for a pandas dtype.

    Example:
        >>> dtype_family(pd.Series([1, 2])), dtype_family(pd.Series([1.5])), \
dtype_family(pd.Series(["a"]))
        ('int', 'float', 'string')
    """
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "float"
    if pd.api.types.is_datetime64_any_dtype(series):
        return "datetime"
    return "string"


def _dtype_ok(expected: str, series: pd.Series) -> bool:
    got = dtype_family(series)
    if got == expected:
        return True
    if expected == "float" and got == "int":
        return True  # integers are valid floats
    if expected == "int" and got == "float":
        # A batch of an integer column that holds a null is read as float64.
        values = series.dropna().to_numpy(dtype=np.float64)
        return bool(np.all(np.isfinite(values) & (values == np.round(values))))
    return False


class ContractChecker:
    """Checks a contract over a stream of pandas batches.

    Args:
        contract: The contract.
        label: The label column (for ``table.label_balance``).
        drop: ``data.on_violation=drop``: table-level counts (rows, label balance) are taken
            over the rows that survive the per-row checks.

    Example:
        >>> c = load_contract({"columns": {"x": {"min": 0}, "y": {"categories": ["a"]}}})
        >>> checker = ContractChecker(c)
        >>> failed = checker.update(pd.DataFrame({"x": [1, -1, 2], "y": ["a", "a", "b"]}))
        >>> failed.tolist()
        [False, True, True]
        >>> [(v.column, v.check, v.failing_rows) for v in checker.finish()]
        [('x', 'min 0.0', 1), ('y', 'categories', 1)]
    """

    def __init__(self, contract: Contract, label: str | None = None, drop: bool = False) -> None:
        self.contract, self.label, self.drop = contract, label, drop
        self.rows = 0  # rows seen
        self.kept = 0  # rows passing the per-row checks
        self.found: dict[tuple[str, str], Violation] = {}
        self.nulls: dict[str, int] = {}
        self.hashes: dict[str, list[np.ndarray]] = {}
        self.label_counts: dict[str, int] = {}
        self._schema: Any = None
        self._schema_columns: tuple[str, ...] = ()

    def _add(
        self,
        column: str,
        check: str,
        rows: int | None,
        examples: Iterable[Any],
        droppable: bool,
        data: bool = False,
    ) -> None:
        """Record failing rows; ``data``: the examples are data values (shown quoted, cut)."""
        v = self.found.get((column, check))
        if v is None:
            v = self.found[(column, check)] = Violation(column, check, 0, [], droppable)
        if rows is not None:
            v.failing_rows = (v.failing_rows or 0) + rows
        for ex in examples:
            if len(v.examples) >= MAX_EXAMPLES:
                break
            text = _example(ex) if data else str(ex)
            if text not in v.examples:
                v.examples.append(text)

    def _pandera_schema(self, columns: tuple[str, ...]) -> Any:
        if self._schema is not None and self._schema_columns == columns:
            return self._schema
        import pandera.pandas as pa

        specs = {}
        for name in columns:
            col = self.contract.columns[name]
            checks = []
            if col.min is not None:
                checks.append(pa.Check.ge(col.min, error=f"min {col.min}"))
            if col.max is not None:
                checks.append(pa.Check.le(col.max, error=f"max {col.max}"))
            if col.categories is not None:
                checks.append(pa.Check.isin(col.categories, error="categories"))
            nullable = col.nullable or col.max_null_fraction is not None
            specs[name] = pa.Column(None, checks=checks, nullable=nullable, required=False)
        self._schema = pa.DataFrameSchema(specs)
        self._schema_columns = columns
        return self._schema

    def row_failures(self, frame: pd.DataFrame, record: bool = True) -> np.ndarray:
        """Per-row checks on one batch: True for rows that fail any; records them if asked."""
        import pandera.errors

        failed = np.zeros(len(frame), dtype=bool)
        checkable = []
        for name, col in self.contract.columns.items():
            if name not in frame.columns:
                continue
            if col.dtype is not None and not _dtype_ok(col.dtype, frame[name]):
                continue  # reported as a dtype violation; value checks would only add noise
            checkable.append(name)
        if not checkable:
            return failed
        frame = frame.reset_index(drop=True)
        schema = self._pandera_schema(tuple(checkable))
        try:
            schema.validate(frame[checkable], lazy=True)
        except pandera.errors.SchemaErrors as exc:
            cases = exc.failure_cases
            cases = cases[cases["index"].notna()]
            failed[cases["index"].astype(int).to_numpy()] = True
            if record:
                for (column, check), group in cases.groupby(["column", "check"], sort=False):
                    check = "nullable: false" if check == "not_nullable" else str(check)
                    self._add(
                        str(column),
                        check,
                        int(group["index"].nunique()),
                        group["failure_case"].head(MAX_EXAMPLES * 2),
                        droppable=True,
                        data=True,
                    )
        return failed

    def update(self, frame: pd.DataFrame) -> np.ndarray:
        """Check one batch; returns True for its rows that fail a per-row check."""
        from forge.data.profile import label_keys
        from forge.data.split import row_hashes

        self.rows += len(frame)
        for name, col in self.contract.columns.items():
            if name not in frame.columns:
                self._add(name, "column missing", len(frame), [], droppable=False)
                continue
            series = frame[name]
            if col.dtype is not None and not _dtype_ok(col.dtype, series):
                got = dtype_family(series)
                self._add(
                    name, f"dtype {col.dtype}", int(series.notna().sum()), [got], droppable=False
                )
            self.nulls[name] = self.nulls.get(name, 0) + int(series.isna().sum())
            if col.unique:
                self.hashes.setdefault(name, []).append(row_hashes(frame[[name]]))
        failed = self.row_failures(frame)
        if self.contract.table.no_duplicate_rows:
            self.hashes.setdefault("<row>", []).append(row_hashes(frame))
        kept = frame[~failed] if self.drop else frame
        self.kept += len(kept)
        if self.label is not None and self.label in kept.columns:
            keys = label_keys(kept[self.label]).dropna()
            for key, n in keys.value_counts(sort=False).items():
                self.label_counts[key] = self.label_counts.get(key, 0) + int(n)
        return failed

    def finish(self) -> list[Violation]:
        """Every violation found, including the table-level ones."""
        table = self.contract.table
        rows = self.kept if self.drop else self.rows
        for name, col in self.contract.columns.items():
            if col.max_null_fraction is not None and self.rows:
                share = self.nulls.get(name, 0) / self.rows
                if share > col.max_null_fraction:
                    self._add(
                        name,
                        f"max_null_fraction {col.max_null_fraction}",
                        self.nulls[name],
                        [f"{share:.4f} null"],
                        droppable=False,
                    )
        for name, parts in self.hashes.items():
            hashes = np.concatenate(parts) if parts else np.empty(0, np.uint64)
            repeats = len(hashes) - len(np.unique(hashes))
            if repeats:
                column, check = (
                    ("<table>", "no_duplicate_rows") if name == "<row>" else (name, "unique")
                )
                self._add(column, check, repeats, [], droppable=False)
        if table.min_rows is not None and rows < table.min_rows:
            self._add(
                "<table>", f"min_rows {table.min_rows}", None, [f"{rows} rows"], droppable=False
            )
        if table.label_balance is not None and self.label is not None:
            total = sum(self.label_counts.values())
            bounds = table.label_balance
            for key, n in sorted(self.label_counts.items()):
                share = n / total
                if not bounds.min <= share <= bounds.max:
                    self._add(
                        self.label,
                        f"label_balance [{bounds.min}, {bounds.max}]",
                        None,
                        [f"class {key}: {share:.3f}"],
                        droppable=False,
                    )
        return list(self.found.values())


def violation_table(violations: list[Violation]) -> str:
    """The violations as one plain-text table (column, check, failing rows, examples).

    Example:
        >>> print(violation_table([Violation("age", "min 0.0", 2, ["-1", "-3"])]))
        column  check    failing rows  examples
        age     min 0.0  2             -1, -3
    """
    header = ("column", "check", "failing rows", "examples")
    rows = [
        (
            v.column,
            v.check,
            "-" if v.failing_rows is None else str(v.failing_rows),
            ", ".join(v.examples),
        )
        for v in violations
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)), r[3]]).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def infer_contract(
    frames: Iterable[pd.DataFrame], label: str | None = None, margin: float = 0.1
) -> dict[str, Any]:
    """Draft a contract from trusted data, for a person to review.

    Per column: the dtype, nullability (or a ``max_null_fraction`` twice the observed one),
    the observed range widened by ``margin`` of its width on each side, categories for text
    columns with at most 50 distinct values, ``unique`` for int/text columns without repeats.
    For the table: ``min_rows`` a tenth of the rows seen, label balance within ``margin`` of the
    observed shares, ``no_duplicate_rows`` when there were none.

    Example:
        >>> draft = infer_contract([pd.DataFrame({"x": [0.0, 10.0], "c": ["a", "b"]})])
        >>> draft["columns"]["x"], draft["columns"]["c"]["categories"]
        ({'dtype': 'float', 'nullable': False, 'min': -1.0, 'max': 11.0}, ['a', 'b'])
    """
    from forge.data.split import row_hashes

    rows = 0
    dtypes: dict[str, set[str]] = {}
    nulls: dict[str, int] = {}
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    cats: dict[str, set[Any] | None] = {}
    hashes: dict[str, list[np.ndarray]] = {}
    row_parts: list[np.ndarray] = []
    labels: dict[Any, int] = {}
    for frame in frames:
        rows += len(frame)
        row_parts.append(row_hashes(frame))
        for name in frame.columns:
            series = frame[name]
            dtypes.setdefault(name, set())
            if series.notna().any():
                dtypes[name].add(dtype_family(series))
            nulls[name] = nulls.get(name, 0) + int(series.isna().sum())
            present = series.dropna()
            family = dtype_family(series)
            if family in ("int", "float") and len(present):
                lo[name] = min(lo.get(name, math.inf), float(present.min()))
                hi[name] = max(hi.get(name, -math.inf), float(present.max()))
            if family in ("string", "bool"):
                seen = cats.setdefault(name, set())
                if seen is not None:
                    seen.update(present.unique().tolist())
                    if len(seen) > 50:
                        cats[name] = None
            if family in ("int", "string"):
                hashes.setdefault(name, []).append(row_hashes(frame[[name]]))
            if name == label:
                for key, n in present.value_counts(sort=False).items():
                    labels[key] = labels.get(key, 0) + int(n)
    columns: dict[str, Any] = {}
    for name, families in dtypes.items():
        family = "float" if families == {"int", "float"} else (sorted(families) or ["string"])[0]
        col: dict[str, Any] = {"dtype": family}
        share = nulls[name] / rows if rows else 0.0
        if share == 0:
            col["nullable"] = False
        else:
            col["max_null_fraction"] = round(min(1.0, 2 * share + 0.001), 4)
        if name in lo:
            width = (hi[name] - lo[name]) or abs(hi[name]) or 1.0
            low, high = lo[name] - margin * width, hi[name] + margin * width
            if family == "int":
                low, high = math.floor(low), math.ceil(high)
            col["min"], col["max"] = low, high
        if cats.get(name):
            col["categories"] = sorted(cats[name], key=str)  # type: ignore[arg-type]
        if name in hashes and name != label and rows > 1:
            all_hashes = np.concatenate(hashes[name])
            if len(np.unique(all_hashes)) == len(all_hashes) and share == 0:
                col["unique"] = True
        columns[name] = col
    table: dict[str, Any] = {"min_rows": max(1, rows // 10)}
    if label is not None and labels:
        total = sum(labels.values())
        shares = [n / total for n in labels.values()]
        table["label_balance"] = {
            "min": round(max(0.0, min(shares) - margin), 4),
            "max": round(min(1.0, max(shares) + margin), 4),
        }
    if row_parts:
        all_rows = np.concatenate(row_parts)
        if len(np.unique(all_rows)) == len(all_rows):
            table["no_duplicate_rows"] = True
    return {"columns": columns, "table": table}
