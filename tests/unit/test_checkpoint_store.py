"""The checkpoint subsystem on memory:// and local paths: commit protocol, verification on
resume, retention, multi-rank manifests, and safe deserialization."""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from forge.checkpoint import storage
from forge.checkpoint.manifest import MANIFEST, FileEntry, Manifest
from forge.checkpoint.serialize import (
    bytes_to_object,
    bytes_to_tensors,
    object_to_bytes,
    tensors_to_bytes,
)
from forge.checkpoint.store import POINTER, CheckpointStore, open_checkpoint, step_dir_name
from forge.errors import CheckpointError


@pytest.fixture(params=["memory", "local"])
def run_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh run folder on each backend (memory:// is process-global: unique names)."""
    if request.param == "memory":
        return f"memory://forge-unit-{uuid.uuid4().hex}/run"
    return str(tmp_path / "run")


def ckpt_path(run_uri: str, step: int, name: str = "") -> str:
    parts = ["checkpoints", step_dir_name(step)] + ([name] if name else [])
    return storage.join(storage.normalize(run_uri), *parts)


def save(store: CheckpointStore, step: int, **kwargs: Any):
    files = kwargs.pop("files", None) or {"model.bin": f"weights@{step}".encode() * 10}
    return store.save(step, files, strategy="test", **kwargs)


# --------------------------------------------------------------------------------------------
# storage


def test_normalize_and_join(tmp_path: Path) -> None:
    assert storage.normalize("memory://bucket/run/") == "memory://bucket/run"
    assert storage.normalize(f"file://{tmp_path}") == str(tmp_path)
    assert storage.normalize("relative/dir") == os.path.abspath("relative/dir")
    assert storage.join("s3://b/runs/", "/exp/", "ckpt") == "s3://b/runs/exp/ckpt"
    assert storage.is_remote("s3://b") and not storage.is_remote("file:///x")
    assert not storage.is_remote(str(tmp_path))


def test_list_dir_of_a_missing_folder_is_empty(run_uri: str) -> None:
    assert storage.list_dir(storage.join(storage.normalize(run_uri), "nope")) == []


# --------------------------------------------------------------------------------------------
# save / commit / latest


def test_save_commit_latest_round_trip(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    assert store.latest() is None
    assert store.committed() == []

    committed = save(
        store,
        10,
        files={"a.bin": b"hello", "b.bin": b"world"},
        metrics={"val/loss": 0.5},
        state={"epoch": 1},
        config_hash="abc",
        git_sha="deadbeef",
    )
    assert committed is not None and committed.step == 10
    latest = store.latest()
    assert latest is not None
    assert latest.uri == committed.uri == ckpt_path(run_uri, 10)
    assert latest.read("a.bin") == b"hello"
    assert latest.read("b.bin") == b"world"
    m = latest.manifest
    assert (m.step, m.world_size, m.strategy) == (10, 1, "test")
    assert m.metrics == {"val/loss": 0.5}
    assert m.state == {"epoch": 1}
    assert (m.config_hash, m.git_sha) == ("abc", "deadbeef")
    assert m.files["a.bin"] == FileEntry.of(b"hello")

    save(store, 20)
    assert store.latest().step == 20
    assert [c.step for c in store.committed()] == [10, 20]
    pointer = json.loads(storage.read_bytes(storage.join(store.root, POINTER)))
    assert pointer == {"step": 20, "name": "step_00000020"}


def test_reading_an_unlisted_file_is_an_error(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    ckpt = save(store, 1)
    with pytest.raises(CheckpointError, match="has no file 'other.bin'"):
        ckpt.read("other.bin")


def test_steps_sort_numerically_not_by_name(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    for step in (9, 100, 10):
        save(store, step)
    assert [c.step for c in store.committed()] == [9, 10, 100]
    assert store.latest().step == 100


def test_folder_without_manifest_is_invisible(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    save(store, 5)
    # A crash mid-save: files written, manifest never.
    storage.write_bytes(ckpt_path(run_uri, 10, "model.bin"), b"partial")
    assert [c.step for c in store.committed()] == [5]
    assert store.latest().step == 5


def test_unreadable_manifest_is_invisible(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    save(store, 5)
    save(store, 10)
    storage.write_bytes(ckpt_path(run_uri, 10, MANIFEST), b'{"step": 10, "fo')
    assert [c.step for c in store.committed()] == [5]
    with pytest.raises(CheckpointError, match="unreadable"):
        open_checkpoint(ckpt_path(run_uri, 10))


def test_open_checkpoint_on_an_uncommitted_folder(run_uri: str) -> None:
    storage.write_bytes(ckpt_path(run_uri, 7, "model.bin"), b"partial")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(ckpt_path(run_uri, 7))
    msg = str(info.value)
    assert ckpt_path(run_uri, 7) in msg
    assert "not a committed checkpoint" in msg
    assert "resume=auto" in msg


def test_open_checkpoint_on_a_missing_folder(run_uri: str) -> None:
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        open_checkpoint(ckpt_path(run_uri, 999))


def test_open_checkpoint_accepts_a_trailing_slash(run_uri: str) -> None:
    ckpt = save(CheckpointStore(run_uri), 3)
    assert open_checkpoint(ckpt.uri + "/").uri == ckpt.uri


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_a_bit(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]


@pytest.mark.parametrize("damage", [_truncate, _flip_a_bit], ids=["truncated", "bit-flipped"])
def test_latest_skips_a_corrupt_checkpoint_with_a_warning(
    run_uri: str, damage, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(run_uri)
    save(store, 10)
    save(store, 20)
    path = ckpt_path(run_uri, 20, "model.bin")
    storage.write_bytes(path, damage(storage.read_bytes(path)))

    with caplog.at_level(logging.WARNING, logger="forge.checkpoint.store"):
        latest = store.latest()
    assert latest is not None and latest.step == 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(ckpt_path(run_uri, 20) in w for w in warnings), warnings
    # Without verification the corrupt one is still the newest committed.
    assert store.latest(verify=False).step == 20
    with pytest.raises(CheckpointError, match="model.bin"):
        open_checkpoint(ckpt_path(run_uri, 20))


def test_missing_file_fails_verification(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    save(store, 10)
    storage.remove(ckpt_path(run_uri, 10, "model.bin"))
    with pytest.raises(CheckpointError, match="model.bin is missing"):
        open_checkpoint(ckpt_path(run_uri, 10))
    assert store.latest() is None


def test_read_verifies_against_the_manifest(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    ckpt = save(store, 10)
    path = ckpt_path(run_uri, 10, "model.bin")
    storage.write_bytes(path, _flip_a_bit(storage.read_bytes(path)))
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.read("model.bin")


def test_all_corrupt_means_no_latest(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    save(store, 1)
    path = ckpt_path(run_uri, 1, "model.bin")
    storage.write_bytes(path, _truncate(storage.read_bytes(path)))
    assert store.latest() is None


def test_resaving_a_step_overwrites_the_partial_folder(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    storage.write_bytes(ckpt_path(run_uri, 10, "model.bin"), b"half-written")
    ckpt = save(store, 10, files={"model.bin": b"complete"})
    assert store.latest().read("model.bin") == b"complete" == ckpt.read("model.bin")


# --------------------------------------------------------------------------------------------
# retention


def test_retention_keeps_the_last_n(run_uri: str) -> None:
    store = CheckpointStore(run_uri, keep_last=2)
    for step in range(1, 6):
        save(store, step)
    assert [c.step for c in store.committed()] == [4, 5]
    assert not storage.exists(ckpt_path(run_uri, 1))
    assert store.latest().step == 5


def test_retention_keep_last_one_never_deletes_the_newest(run_uri: str) -> None:
    store = CheckpointStore(run_uri, keep_last=1)
    for step in (1, 2, 3):
        save(store, step)
        assert [c.step for c in store.committed()] == [step]


def test_retention_none_keeps_everything(run_uri: str) -> None:
    store = CheckpointStore(run_uri, keep_last=None)
    for step in range(1, 6):
        save(store, step)
    assert [c.step for c in store.committed()] == [1, 2, 3, 4, 5]
    assert store.apply_retention() == []


def test_retention_ignores_uncommitted_folders(run_uri: str) -> None:
    store = CheckpointStore(run_uri, keep_last=1)
    storage.write_bytes(ckpt_path(run_uri, 99, "model.bin"), b"partial")
    save(store, 1)
    save(store, 2)
    assert [c.step for c in store.committed()] == [2]


@pytest.mark.parametrize(("mode", "best_step"), [("min", 2), ("max", 4)])
def test_retention_keeps_the_best_by_monitor(run_uri: str, mode: str, best_step: int) -> None:
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.9, 5: 0.3, 6: 0.35}
    store = CheckpointStore(run_uri, keep_last=2, monitor="val/loss", mode=mode)
    for step, loss in losses.items():
        save(store, step, metrics={"val/loss": loss})
    assert store.best().step == best_step
    assert [c.step for c in store.committed()] == sorted({best_step, 5, 6})


def test_best_ignores_checkpoints_without_the_metric(run_uri: str) -> None:
    store = CheckpointStore(run_uri, keep_last=1, monitor="val/loss")
    save(store, 1, metrics={"val/loss": 0.2})
    save(store, 2, metrics={})
    save(store, 3, metrics={"train/loss": 0.01})
    assert store.best().step == 1
    assert [c.step for c in store.committed()] == [1, 3]


def test_best_is_none_without_monitor(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    save(store, 1, metrics={"val/loss": 0.2})
    assert store.best() is None


# --------------------------------------------------------------------------------------------
# several ranks


def test_two_ranks_files_are_merged_into_one_manifest(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    gathered: list[dict[str, FileEntry]] = []

    def gather_rank1(entries: dict[str, FileEntry]) -> None:
        gathered.append(entries)
        return None  # non-zero ranks get nothing back

    def gather_rank0(entries: dict[str, FileEntry]) -> list[dict[str, FileEntry]]:
        return [entries, *gathered]

    out1 = store.save(
        30,
        {"rank1.bin": b"one", "shard1.bin": b"s1"},
        rank=1,
        world_size=2,
        gather=gather_rank1,
        strategy="ddp",
    )
    assert out1 is None
    # Rank 1 has written but nobody committed yet: invisible.
    assert store.latest() is None

    out0 = store.save(
        30,
        {"rank0.bin": b"zero", "model.bin": b"m"},
        rank=0,
        world_size=2,
        gather=gather_rank0,
        strategy="ddp",
    )
    assert out0 is not None
    assert out0.manifest.world_size == 2
    assert set(out0.manifest.files) == {"rank0.bin", "model.bin", "rank1.bin", "shard1.bin"}
    latest = store.latest()
    assert latest.step == 30
    assert latest.read("rank1.bin") == b"one"
    assert latest.read("rank0.bin") == b"zero"


def test_two_ranks_writing_the_same_file_is_refused(run_uri: str) -> None:
    store = CheckpointStore(run_uri)
    other = {"model.bin": FileEntry.of(b"x")}
    with pytest.raises(CheckpointError, match="model.bin"):
        store.save(
            1, {"model.bin": b"x"}, world_size=2, gather=lambda e: [e, other], strategy="ddp"
        )
    assert store.latest() is None


# --------------------------------------------------------------------------------------------
# manifest and serialization


def test_manifest_round_trip_and_format_check() -> None:
    m = Manifest(
        step=3,
        world_size=2,
        strategy="ddp",
        files={"a": FileEntry.of(b"abc")},
        metrics={"val/loss": 1.5},
        state={"epoch": 2},
    )
    back = Manifest.from_json(m.to_json())
    assert back == m
    raw = json.loads(m.to_json())
    raw["format"] = "something-else/9"
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        Manifest.from_json(json.dumps(raw).encode())


def test_object_round_trip() -> None:
    layer = nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"step": 3, "lr": [0.1, 0.2], "t": torch.arange(4.0), "none": None}
    back = bytes_to_object(object_to_bytes(state), "x.pt")
    assert back["step"] == 3 and back["lr"] == [0.1, 0.2] and back["none"] is None
    assert torch.equal(back["t"], torch.arange(4.0))
    opt_back = bytes_to_object(object_to_bytes(opt.state_dict()), "optim.pt")
    assert opt_back["param_groups"][0]["lr"] == 0.1
    assert torch.equal(opt_back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


class _Touch:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Open:
    """Unpickling this creates a file through builtins.open."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def _torch_save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload", [_Touch, _Open])
@pytest.mark.parametrize(
    "container",
    [
        lambda o: _torch_save({"state": o}),  # zip format, as torch.save writes it
        lambda o: pickle.dumps({"state": o}),  # a bare pickle stream
        lambda o: pickle.dumps(o, protocol=2),
    ],
    ids=["torch-zip", "pickle", "pickle-p2"],
)
def test_malicious_pickle_is_refused(tmp_path: Path, payload, container) -> None:
    marker = tmp_path / "pwned"
    data = container(payload(marker))
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        bytes_to_object(data, "optim.pt")
    assert not marker.exists(), "unpickling ran code"
    msg = str(info.value)
    assert "optim.pt" in msg and "refused to load" in msg


def test_malicious_optimizer_file_in_a_committed_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    store = CheckpointStore(str(tmp_path / "run"))
    store.save(1, {"optim.pt": _torch_save({"state": _Touch(marker)})}, strategy="ddp")
    data = store.latest().read("optim.pt")  # the manifest matches: the file is what was saved
    with pytest.raises(CheckpointError):
        bytes_to_object(data, "optim.pt")
    assert not marker.exists()


def test_garbage_bytes_are_refused() -> None:
    with pytest.raises(CheckpointError, match="refused to load"):
        bytes_to_object(b"not a checkpoint at all", "x.pt")


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_round_trip() -> None:
    torch.manual_seed(0)
    model = _Tied()
    state = model.state_dict()
    assert state["embed.weight"].data_ptr() == state["head.weight"].data_ptr()
    loaded = bytes_to_tensors(tensors_to_bytes(state))
    assert set(loaded) == {"embed.weight", "head.weight"}
    assert torch.equal(loaded["embed.weight"], model.embed.weight.detach())
    assert torch.equal(loaded["head.weight"], model.embed.weight.detach())

    torch.manual_seed(1)
    fresh = _Tied()
    fresh.load_state_dict(loaded)
    assert fresh.head.weight is fresh.embed.weight  # still tied
    assert torch.equal(fresh.embed.weight, model.embed.weight)


def test_views_and_non_contiguous_tensors_round_trip() -> None:
    base = torch.arange(6.0)
    tensors = {"part": base[2:4], "whole": base, "t": base.view(2, 3).t()}
    loaded = bytes_to_tensors(tensors_to_bytes(tensors))
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_tensors_to_bytes_writes_what_safetensors_writes() -> None:
    """forge lays the file out itself (to copy without the GIL); the library is the oracle."""
    from safetensors.torch import _TYPES
    from safetensors.torch import save as st_save

    torch.manual_seed(0)
    tensors = {
        f"t_{name}": torch.randn(3, 2).to(dtype)
        if dtype.is_floating_point or dtype.is_complex
        else torch.arange(6).reshape(3, 2).to(dtype)
        for name, dtype in _TYPES.items()
        if "FNUZ" not in name  # not laid out by forge: left to the library
    }
    tied = torch.randn(4)
    tensors |= {
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(4, 3).t(),
        "slice": torch.arange(10.0)[3:7],
        "naïve": torch.ones(1),  # a non-ASCII name: UTF-8 in the header, as serde writes it
        "tied.a": tied,
        "tied.b": tied,
    }
    out = tensors_to_bytes(tensors)
    assert isinstance(out, memoryview)  # filled in place, not a bytes object from the library
    assert bytes(out) == st_save({k: v.contiguous().clone() for k, v in tensors.items()})
    assert bytes(tensors_to_bytes({})) == st_save({})
    fnuz = {"f": torch.zeros(2, dtype=torch.float8_e4m3fnuz)}
    assert bytes(tensors_to_bytes(fnuz)) == st_save(fnuz)


@pytest.mark.parametrize("capacity", [None, 10], ids=["sized", "grown"])
def test_object_to_bytes_writes_what_torch_save_writes(monkeypatch, capacity) -> None:
    import forge.checkpoint.serialize as serialize

    if capacity is not None:  # an estimate far too small: the buffer grows as records arrive
        monkeypatch.setattr(serialize, "_storage_bytes", lambda obj: capacity)
    copied: list[int] = []
    real_memmove = serialize.ctypes.memmove
    monkeypatch.setattr(
        serialize.ctypes, "memmove", lambda d, s, n: copied.append(n) or real_memmove(d, s, n)
    )
    layer = nn.Linear(300, 200)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 300)).sum().backward()
    opt.step()
    state = {"optim": opt.state_dict(), "model": layer.state_dict(), "step": 7}
    out = object_to_bytes(state)
    assert bytes(out) == _torch_save(state)
    # The large tensor records (the weight, its exp_avg and exp_avg_sq) were copied by the
    # foreign call, which releases the GIL; the biases are small enough to copy inline.
    assert sum(copied) >= 3 * layer.weight.numel() * 4


def test_tensors_to_bytes_does_not_alter_the_input() -> None:
    t = torch.ones(3)
    state = {"a": t, "b": t}
    tensors_to_bytes(state)
    assert state["a"] is t and state["b"] is t


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_a_non_finite_metric_never_ranks_best(run_uri: str, bad: float) -> None:
    """Issue 8 case: val/loss NaN, 0.5, 0.3, 0.4 at steps 10-40, keep_last=1. The NaN (or a
    -inf, which min-mode would otherwise pick) must not rank: step 30 is the best and is kept."""
    store = CheckpointStore(run_uri, keep_last=1, monitor="val/loss", mode="min")
    for step, loss in {10: bad, 20: 0.5, 30: 0.3, 40: 0.4}.items():
        save(store, step, metrics={"val/loss": loss})
    assert store.best().step == 30
    assert [c.step for c in store.committed()] == [30, 40]
    assert [c.step for c in store.top(3)] == [30, 40]


def test_an_inf_metric_never_ranks_best_in_max_mode(run_uri: str) -> None:
    store = CheckpointStore(run_uri, keep_last=1, monitor="val/accuracy", mode="max")
    for step, acc in {10: float("inf"), 20: 0.5, 30: 0.9, 40: "n/a", 50: 0.1}.items():
        save(store, step, metrics={"val/accuracy": acc})
    assert store.best().step == 30
    assert [c.step for c in store.committed()] == [30, 50]
