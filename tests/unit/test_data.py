"""forge.data without Ray: profile, fingerprint, contracts, split, bad sources, CLI verbs."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

from forge.checkpoint.storage import StorageOptions
from forge.config.specs import DataSpec
from forge.data import profile as profiles
from forge.data.contract import ContractChecker, load_contract
from forge.data.prepare import prepare_files, profile_dataset
from forge.data.source import resolve
from forge.data.split import val_mask
from forge.errors import ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
from make_tabular_data import make_frame, write

OPTS = StorageOptions()


@pytest.fixture()
def loans(tmp_path) -> str:
    out = str(tmp_path / "loans")
    write(out, rows=4000, shards=3)
    return out


def _prepare(**data) -> object:
    data.setdefault("batch_size", 8)
    return prepare_files(DataSpec(**data), OPTS)


# -- profile -------------------------------------------------------------------------------


def test_profile_histogram_counts_sum_to_non_null_count_exact_and_sampled() -> None:
    rng = np.random.default_rng(0)
    frames = [
        pd.DataFrame({"x": np.where(rng.random(700) < 0.1, np.nan, rng.normal(size=700)), "y": 1})
        for _ in range(10)
    ]
    for exact_rows in (10_000, 500):  # exact, then sampled quantiles + a second counting pass
        builder = profiles.ProfileBuilder(exact_rows=exact_rows)
        for frame in frames:
            builder.update(frame)
        doc = builder.finish(source="s", fingerprint="f", rescan=lambda: iter(frames))
        col = doc["columns"]["x"]
        non_null = int(sum(f["x"].notna().sum() for f in frames))
        assert doc["rows"] == 7000 and col["count"] == non_null
        assert sum(col["histogram"]["counts"]) == non_null
        edges = col["histogram"]["edges"]
        assert edges[0] == col["min"] and edges[-1] == col["max"]
        assert all(a < b for a, b in zip(edges, edges[1:], strict=False))
        assert col["null_fraction"] == pytest.approx((7000 - non_null) / 7000)
        # equal-frequency bins: each holds about a tenth of the values
        assert max(col["histogram"]["counts"]) < 0.13 * non_null


def test_profile_exact_values() -> None:
    builder = profiles.ProfileBuilder(label="y")
    builder.update(
        pd.DataFrame(
            {"x": np.arange(100.0), "c": ["a"] * 70 + ["b"] * 29 + [None], "y": [0] * 25 + [1] * 75}
        )
    )
    doc = builder.finish(source="s", fingerprint="f")
    x = doc["columns"]["x"]
    assert x["histogram"]["counts"] == [10] * 10
    assert x["quantiles"]["0.5"] == 49.5 and x["mean"] == 49.5
    assert x["std"] == pytest.approx(np.arange(100.0).std(ddof=1))
    assert doc["columns"]["c"]["counts"] == {"a": 70, "b": 29}
    assert doc["columns"]["c"]["null_fraction"] == 0.01
    assert doc["label_distribution"] == {"0": 25, "1": 75}
    assert profiles.loads(profiles.dumps(doc))["format"] == "forge.data_profile"
    with pytest.raises(ValueError, match="version"):
        profiles.loads(json.dumps({**doc, "version": 2}).encode())


def test_in_memory_recipe_profile_and_fingerprint() -> None:
    import recipes.tabular as tabular

    train, _ = tabular.split(*tabular.load_frame(), 0.2, 0)
    prepared = profile_dataset(train, "recipe:tabular")
    doc = prepared.profile
    assert doc["rows"] == 456 == prepared.fingerprint["rows"]
    assert len(doc["columns"]) == 30
    for col in doc["columns"].values():
        assert sum(col["histogram"]["counts"]) == col["count"] == 456
    assert sum(doc["label_distribution"].values()) == 456
    assert doc["fingerprint"] == prepared.fingerprint["sha256"]
    again = profile_dataset(train, "recipe:tabular").fingerprint
    train.tensors[0][0, 0] += 1.0  # one value changes: a different fingerprint
    assert again == prepared.fingerprint
    assert profile_dataset(train, "recipe:tabular").fingerprint["sha256"] != again["sha256"]


# -- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_changes_when_one_file_changes(loans) -> None:
    first = _prepare(source=loans, label="default").fingerprint
    assert first == _prepare(source=loans, label="default").fingerprint
    assert [f["size"] for f in first["files"]] == [
        os.path.getsize(os.path.join(loans, n)) for n in sorted(os.listdir(loans))
    ]
    path = os.path.join(loans, sorted(os.listdir(loans))[1])
    make_frame(1334, seed=99).to_parquet(path, index=False)  # same row count, new content
    changed = _prepare(source=loans, label="default").fingerprint
    assert changed["sha256"] != first["sha256"] and changed["rows"] == first["rows"]
    assert changed["files"][0] == first["files"][0] and changed["files"][1] != first["files"][1]


def test_fingerprint_changes_when_a_file_changes_but_keeps_its_size(tmp_path) -> None:
    write(str(tmp_path / "csv"), rows=300, shards=2, fmt="csv")
    first = _prepare(source=str(tmp_path / "csv"), label="default").fingerprint
    path = tmp_path / "csv" / "part-00001.csv"
    text = path.read_text()
    i = text.index("\n1") + 1  # an id that starts with 1 ...
    path.write_text(text[:i] + "9" + text[i + 1 :])  # ... becomes 9: same size, new content
    stat = os.stat(path)
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))  # coarse clocks: make the write visible
    changed = _prepare(source=str(tmp_path / "csv"), label="default").fingerprint
    assert [f["size"] for f in changed["files"]] == [f["size"] for f in first["files"]]
    assert changed["sha256"] != first["sha256"]


# -- split ---------------------------------------------------------------------------------


def test_split_is_deterministic_and_independent_of_batching_and_dtype() -> None:
    frame = make_frame(5000)
    whole = val_mask(frame, 0.2, None, seed=7)
    pieces = np.concatenate(
        [val_mask(frame.iloc[i : i + 777], 0.2, None, 7) for i in range(0, 5000, 777)]
    )
    assert (whole == pieces).all()
    assert abs(whole.mean() - 0.2) < 0.02
    assert not (whole == val_mask(frame, 0.2, None, seed=8)).all()
    # An integer key read as float (a batch holding a null) hashes the same.
    ids = pd.DataFrame({"id": np.arange(100)})
    as_float = pd.DataFrame({"id": np.arange(100, dtype=np.float64)})
    assert (val_mask(ids, 0.3, "id", 1) == val_mask(as_float, 0.3, "id", 1)).all()
    # pandas' string inference must not change which side a row lands on.
    with pd.option_context("future.infer_string", False):
        legacy = val_mask(frame.astype({"region": object}), 0.2, None, seed=7)
    assert (legacy == whole).all()
    assert int(whole.sum()) == 963  # pinned: the split of this data must not drift


def test_split_rows_match_the_driver_counts(loans) -> None:
    from forge.data.feed import SplitRows
    from forge.data.source import read_batches

    prepared = _prepare(source=loans, label="default", val_fraction=0.25, split_key="id")
    table = prepared.table
    train = val = 0
    train_ids: set[int] = set()
    for frame in read_batches(table.source, batch_rows=999):  # other batch boundaries
        a, b = SplitRows(table, "train")(frame), SplitRows(table, "val")(frame)
        train += len(a)
        val += len(b)
        train_ids |= set(frame.loc[~val_mask(frame, 0.25, "id", 0), "id"])
    assert (train, val) == (table.train_rows, table.val_rows) and train + val == 4000
    assert prepared.profile["rows"] == train


# -- contracts -----------------------------------------------------------------------------

FIVE = {
    "columns": {
        "id": {"dtype": "int", "unique": True},
        "age": {"dtype": "float", "min": 18, "max": 90},
        "income": {"dtype": "float", "nullable": False},
        "region": {"dtype": "string", "categories": ["north", "south", "east", "west", "center"]},
        "plan": {"dtype": "float"},
    },
    "table": {"min_rows": 100_000},
}


def _bad_loans(tmp_path) -> str:
    frame = make_frame(3000)
    frame.loc[5, "age"] = -4.0  # below min
    frame.loc[6, "age"] = 130.0  # above max
    frame.loc[7, "region"] = "atlantis"  # not a category
    frame.loc[8, "id"] = frame.loc[9, "id"]  # not unique
    path = tmp_path / "bad.parquet"
    frame.to_parquet(path, index=False)
    return str(path)


def test_contract_lists_every_violation_at_once(tmp_path) -> None:
    source = _bad_loans(tmp_path)
    with pytest.raises(ConfigError) as err:
        _prepare(source=source, label="default", contract=FIVE)
    text = str(err.value)
    for column, check in [
        ("age", "min 18.0"),
        ("age", "max 90.0"),
        ("income", "nullable: false"),
        ("region", "categories"),
        ("id", "unique"),
        ("plan", "dtype float"),
        ("<table>", "min_rows 100000"),
    ]:
        assert any(column in line and check in line for line in text.splitlines()), (column, check)
    assert "'atlantis'" in text and "-4.0" in text and "3000 rows" in text
    assert "7 violation(s)" in text


def test_drop_mode_removes_failing_rows_and_reports_how_many(tmp_path) -> None:
    source = _bad_loans(tmp_path)
    per_row = {
        "columns": {k: v for k, v in FIVE["columns"].items() if k in ("age", "region", "income")}
    }
    frame = pd.read_parquet(source)
    failing = (
        ~frame.age.between(18, 90)
        | frame.income.isna()
        | ~frame.region.isin(FIVE["columns"]["region"]["categories"])
    )
    dropped = int(failing.sum())  # rows 5, 6, 7 and every null income
    assert 50 < dropped < 200
    prepared = _prepare(source=source, label="default", contract=per_row, on_violation="drop")
    assert prepared.table.train_rows == 3000 - dropped
    assert prepared.profile["rows"] == 3000 - dropped
    assert any(f"dropped {dropped} of 3000 rows" in n for n in prepared.notes)
    assert prepared.profile["columns"]["age"]["max"] <= 90
    # table-level and type violations cannot be dropped: still refused
    with pytest.raises(ConfigError, match="min_rows"):
        _prepare(source=source, label="default", contract=FIVE, on_violation="drop")
    warned = _prepare(source=source, label="default", contract=per_row, on_violation="warn")
    assert warned.table.train_rows == 3000 and "training anyway" in warned.notes[1]


def test_contract_table_checks_label_balance_and_duplicates() -> None:
    contract = load_contract(
        {"table": {"label_balance": {"min": 0.3, "max": 0.7}, "no_duplicate_rows": True}}
    )
    checker = ContractChecker(contract, label="y")
    checker.update(pd.DataFrame({"x": [1, 2, 3], "y": [0, 0, 0]}))
    checker.update(pd.DataFrame({"x": [1, 5], "y": [0, 1]}))  # row (1, 0) repeats across batches
    found = {(v.column, v.check): v for v in checker.finish()}
    assert found[("<table>", "no_duplicate_rows")].failing_rows == 1
    assert found[("y", "label_balance [0.3, 0.7]")].examples == ["class 0: 0.800", "class 1: 0.200"]


def test_bad_contract_is_one_paragraph(tmp_path) -> None:
    with pytest.raises(ConfigError, match="columns.x.minimum"):
        load_contract({"columns": {"x": {"minimum": 3}}})
    with pytest.raises(ConfigError, match="no such file"):
        load_contract(str(tmp_path / "nope.yaml"))


# -- bad sources ---------------------------------------------------------------------------


def test_bad_sources_fail_before_any_worker(tmp_path, loans) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        _prepare(source=str(tmp_path / "missing"), label="default")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        _prepare(source=str(tmp_path / "empty"), label="default")
    make_frame(0).to_parquet(tmp_path / "norows.parquet", index=False)
    with pytest.raises(ConfigError, match="hold no rows"):
        _prepare(source=str(tmp_path / "norows.parquet"), label="default")
    data = open(os.path.join(loans, "part-00000.parquet"), "rb").read()
    (tmp_path / "trunc.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="cannot read .*trunc.parquet.*truncated"):
        _prepare(source=str(tmp_path / "trunc.parquet"), label="default")
    with pytest.raises(ConfigError, match="no column 'defualt'. Did you mean 'default'"):
        _prepare(source=loans, label="defualt")
    one_class = make_frame(500).assign(default=1)
    one_class.to_parquet(tmp_path / "one.parquet", index=False)
    with pytest.raises(ConfigError, match="single class"):
        _prepare(source=str(tmp_path / "one.parquet"), label="default")
    with pytest.raises(ConfigError, match="fewer than data.batch_size=4096"):
        _prepare(source=loans, label="default", batch_size=4096)


def test_glob_folder_and_csv_resolve(tmp_path, loans) -> None:
    assert len(resolve(loans, None, OPTS).files) == 3
    assert len(resolve(os.path.join(loans, "part-0000[01].parquet"), None, OPTS).files) == 2
    write(str(tmp_path / "csv"), rows=600, shards=2, fmt="csv")
    prepared = _prepare(source=str(tmp_path / "csv"), label="default")
    assert prepared.fingerprint["format"] == "csv" and prepared.table.train_rows == 600
    assert prepared.table.categorical[0][0] == "region"


def test_encode_one_hot_and_nulls(loans) -> None:
    table = _prepare(source=loans, label="default", columns=["age", "income", "plan"]).table
    frame = pd.DataFrame(
        {"age": [30.0, None], "income": [1.0, 2.0], "plan": ["plus", "unknown"], "default": [1, 0]}
    )
    x, y = table.encode(frame)
    plans = dict(table.categorical)["plan"]
    assert x.shape == (2, 2 + len(plans)) and table.width == x.shape[1]
    assert x[0, 2 + plans.index("plus")] == 1 and x[1, 2:].sum() == 0
    assert np.isnan(x[1, 0].item()) and y.tolist() == [1, 0]


# -- CLI verbs -----------------------------------------------------------------------------


def _verb(capsys, *argv: str) -> tuple[int, str]:
    from forge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out = capsys.readouterr()
    return exit_info.value.code, out.out + out.err


def test_infer_contract_then_validate_round_trip(tmp_path, capsys, loans) -> None:
    code, draft = _verb(capsys, "infer-contract", f"data.source={loans}", "data.label=default")
    assert code == 0
    contract = tmp_path / "contract.yaml"
    contract.write_text(draft)
    doc = load_contract(str(contract))
    assert doc.columns["id"].unique and doc.columns["region"].categories
    code, out = _verb(
        capsys,
        "validate-data",
        f"data.source={loans}",
        f"data.contract={contract}",
        "data.label=default",
    )
    assert code == 0, out
    assert "passed" in out
    shifted = tmp_path / "shifted"
    write(str(shifted), rows=2000, shards=1)
    path = shifted / "part-00000.parquet"
    pd.read_parquet(path).assign(age=lambda f: f.age + 200).to_parquet(path, index=False)
    code, out = _verb(
        capsys,
        "validate-data",
        f"data.source={shifted}",
        f"data.contract={contract}",
        "data.label=default",
    )
    assert code == 2
    assert "age" in out and "max" in out and "failing rows" in out


def test_monitor_without_validation_rows_is_refused_on_the_driver(loans) -> None:
    from forge.config.compose import compose
    from forge.config.validate import to_run_spec
    from forge.data.prepare import prepare

    spec = to_run_spec(
        compose(["experiment=tabular", f"data.source={loans}", "data.label=default"])
    )
    with pytest.raises(ConfigError, match="checkpoint.monitor=val/loss .* no validation rows"):
        prepare(spec)
    with pytest.raises(ConfigError, match="trains only on its own data"):
        prepare(to_run_spec(compose([f"data.source={loans}", "data.label=default"])))  # digits


def _reference_encode(table, frame: pd.DataFrame):
    """The first, pandas-only encode: the fast one must give exactly these tensors."""
    import torch

    from forge.data.profile import label_keys

    parts = [frame[list(table.numeric)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)]
    for name, cats in table.categorical:
        codes = pd.Categorical(frame[name].astype("string"), categories=list(cats)).codes
        onehot = np.zeros((len(frame), len(cats)), np.float32)
        seen = codes >= 0
        onehot[np.nonzero(seen)[0], codes[seen]] = 1.0
        parts.append(onehot)
    x = torch.from_numpy(np.concatenate(parts, axis=1))
    index = {key: i for i, key in enumerate(table.classes)}
    y = torch.tensor([index.get(k, -100) for k in label_keys(frame[table.label])], dtype=torch.long)
    return x, y


@pytest.mark.parametrize("batch_format", ["pandas", "numpy"])
def test_fast_encode_equals_the_pandas_reference(loans, batch_format) -> None:
    import dataclasses

    table = _prepare(source=loans, label="default").table
    frame = pd.read_parquet(loans).head(300).reset_index(drop=True)
    frame.loc[::7, "region"] = None  # nulls and a category the training data never had
    frame.loc[::11, "plan"] = "never-seen"
    frame.loc[::13, "default"] = 7  # an unknown class
    batch = frame if batch_format == "pandas" else {c: frame[c].to_numpy() for c in frame}
    x, y = table.encode(batch)
    x_ref, y_ref = _reference_encode(table, frame)
    assert torch_equal_nan(x, x_ref) and y.tolist() == y_ref.tolist()
    assert (y == -100).sum() == len(frame.index[::13])
    # string labels, float labels: the same class keys as the profile's label_keys
    for labels, classes in (
        (["yes", None, "no", "maybe"], ("no", "yes")),
        ([1.0, 0.0, float("nan"), 0.5], ("0", "0.5", "1")),
    ):
        small = frame.head(4).copy()
        small["default"] = labels
        t = dataclasses.replace(table, classes=classes)
        assert t.encode(small)[1].tolist() == _reference_encode(t, small)[1].tolist()


def torch_equal_nan(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(
        torch.equal(torch.nan_to_num(a, 1e30), torch.nan_to_num(b, 1e30))
    )


def test_the_driver_profiles_a_recipe_s_data_without_building_its_model(tmp_path) -> None:
    """With train_data(params), build() (the model) never runs on the driver; the profile and
    fingerprint are those of the data build() would give."""
    from forge.config.compose import compose
    from forge.config.validate import to_run_spec
    from forge.data.prepare import prepare_recipe, profile_dataset

    recipe = tmp_path / "nobuild.py"
    recipe.write_text(
        "from recipes.digits import Params, train_size, train_data\n"
        "def build(params):\n"
        "    raise RuntimeError('build() ran on the driver')\n"
    )
    spec = to_run_spec(compose([f"recipe.module={recipe}", "recipe.name=nobuild"]))
    prepared = prepare_recipe(spec)
    from recipes.digits import Params, build

    expected = profile_dataset(build(Params()).train_data, "recipe:nobuild")
    assert prepared.fingerprint == expected.fingerprint
    assert prepared.profile["rows"] == expected.profile["rows"] == 1438
