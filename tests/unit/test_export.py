"""forge export without Ray: every shipped recipe through the parity gate, tampering, budgets,
bare-onnxruntime clients, S3 and sharded (ZeRO-3, FSDP) checkpoints, the CLI verb."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import forge
from forge.checkpoint import storage
from forge.checkpoint.store import CheckpointStore
from forge.errors import CheckpointError, ConfigError
from forge.export import ExportError, ExportSettings, load_verified
from forge.export.cli import parse

sys.path.insert(0, str(Path(__file__).parent))
from export_runs import train_run, train_run_multi

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cheap(**kw: Any) -> ExportSettings:
    """Settings that keep a test to seconds: few latency repeats, small latency batches."""
    return ExportSettings(**{"latency_repeats": 3, "latency_batch_sizes": [1, 8], **kw})


def manifest_of(uri: str) -> dict[str, Any]:
    return json.loads(Path(uri, "manifest.json").read_text())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.set_num_threads(1)
    return train_run(str(tmp_path_factory.mktemp("runs") / "digits"), "digits")


# --------------------------------------------------------------------------------------------
# Every shipped recipe x the default formats


@pytest.mark.parametrize("recipe", ["digits", "tabular", "tinylm", "lightning_digits"])
def test_every_shipped_recipe_passes_the_gate(
    tmp_path: Path, recipe: str, digits_ckpt: str
) -> None:
    ckpt = digits_ckpt if recipe == "digits" else train_run(str(tmp_path / recipe), recipe)
    out = str(tmp_path / f"export-{recipe}")
    result = forge.export(ckpt, out=out, settings=cheap())
    assert result.ok and result.statuses == {
        "onnx": "ok",
        "torch_export": "ok",
        "safetensors": "ok",
    }
    m = manifest_of(out)
    assert m["format"] == "forge.export" and m["version"] == 1
    # Every listed file is there with its size and sha256; failed/absent ones are not.
    on_disk = {p.name for p in Path(out).iterdir()} - {"manifest.json"}
    assert on_disk == set(m["files"])
    for name, entry in m["files"].items():
        assert (
            sha(Path(out, name)) == entry["sha256"]
            and Path(out, name).stat().st_size == entry["size"]
        )
    assert m["source_manifest_sha256"] == sha(Path(ckpt, "manifest.json"))
    assert m["config_hash_matches"] is True
    assert m["formats"]["onnx"]["opset"] == 18
    for fmt in ("onnx", "torch_export", "safetensors"):
        parity = m["formats"][fmt]["parity"]
        assert parity["ok"] and parity["max_abs"] <= 1e-4, fmt
        assert parity["min_argmax_agreement"] == 1.0
        assert set(m["formats"][fmt]["latency"]) == {"batch_1", "batch_8"}
    # golden.npz: batch sizes 1, the export size (4) and 16; two lengths for tinylm.
    golden = np.load(Path(out, "golden.npz"))
    first_input = m["inputs"][0]["name"]
    if recipe == "tinylm":
        assert m["inputs"][0]["shape"] == ["batch", "seq"]
        assert m["outputs"][0]["shape"] == ["batch", "seq", 256]
        assert golden[f"b16_seq8/input/{first_input}"].shape == (16, 8)
        assert json.loads(Path(out, "config.json").read_text())["tied_weights"] == {
            "head.weight": "tok_emb.weight"
        }
    else:
        assert m["inputs"][0]["shape"][0] == "batch"
        assert golden[f"b1/input/{first_input}"].shape[0] == 1
        assert golden[f"b16/output/{m['outputs'][0]['name']}"].shape[0] == 16
    # Model card: YAML front matter, three loading lines per format.
    card = Path(out, "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["formats"] == {"onnx": "ok", "torch_export": "ok", "safetensors": "ok"}
    assert front["license"] == "unspecified" and front["metrics"] == m["metrics"]
    assert card.count("```python") == 3


def test_default_folder_is_under_the_run_and_a_second_export_is_refused(digits_ckpt: str) -> None:
    run = str(Path(digits_ckpt).parents[1])
    result = forge.export(run, formats=["safetensors"], settings=cheap())  # a run folder
    assert result.uri == f"{run}/exports/step_00000004"
    with pytest.raises(ConfigError, match="already holds a committed export"):
        forge.export(run, formats=["safetensors"], settings=cheap())
    forge.export(run, formats=["safetensors"], settings=cheap(overwrite=True))
    with pytest.raises(ConfigError, match="trained without checkpoint.monitor"):
        forge.export(run, settings=cheap(pick="best"))


def test_pick_best_uses_the_runs_monitor(tmp_path: Path) -> None:
    run = tmp_path / "tabular"
    train_run(str(run), "tabular", "checkpoint.monitor=val/loss", "trainer.val_every_n_steps=2")
    best = CheckpointStore(str(run), monitor="val/loss").best()
    assert best is not None
    result = forge.export(str(run), formats=["safetensors"], settings=cheap(pick="best"))
    assert result.manifest["step"] == best.step
    assert result.manifest["metrics"]["val/loss"] == best.manifest.metrics["val/loss"]


def test_cli_exports_and_exits_0(tmp_path: Path, digits_ckpt: str, capsys: Any) -> None:
    from forge.cli import main

    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "export",
                f"checkpoint={digits_ckpt}",
                f"export.out={out}",
                "export.formats=[safetensors]",
                "export.latency_batch_sizes=[1]",
            ]
        )
    assert exit_info.value.code == 0
    assert "safetensors: ok" in capsys.readouterr().err  # forge's console is stderr
    assert manifest_of(str(out))["formats"]["safetensors"]["status"] == "ok"


def test_an_interrupted_upload_leaves_no_manifest(
    tmp_path: Path, digits_ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import forge.export.folder as folder

    real = folder.storage.write_bytes

    def fail_on_card(uri: str, data: bytes, options: Any = None) -> None:
        if uri.endswith("README.md"):
            raise OSError("connection reset")
        real(uri, data, options)

    monkeypatch.setattr(folder.storage, "write_bytes", fail_on_card)
    out = tmp_path / "export"
    with pytest.raises(OSError):
        forge.export(digits_ckpt, formats=["safetensors"], out=str(out), settings=cheap())
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="not a committed export"):
        load_verified(str(out), "safetensors")


def test_bare_onnxruntime_process_reproduces_golden_at_an_unseen_batch_size(
    tmp_path: Path, digits_ckpt: str
) -> None:
    out = tmp_path / "export"
    forge.export(digits_ckpt, formats=["onnx"], out=str(out), settings=cheap())
    client = textwrap.dedent(
        """
        import sys
        import numpy as np, onnxruntime as ort
        golden = np.load(sys.argv[1] + "/golden.npz")
        x, want = golden["b16/input/images"][:7], golden["b16/output/logits"][:7]  # batch 7
        cpu = ["CPUExecutionProvider"]
        session = ort.InferenceSession(sys.argv[1] + "/model.onnx", providers=cpu)
        got = session.run(None, {"images": x})[0]
        assert got.shape == (7, 10), got.shape
        assert np.allclose(got, want, rtol=1e-3, atol=1e-5), np.abs(got - want).max()
        assert (got.argmax(1) == want.argmax(1)).all()
        # The model card's three ONNX lines, run as written (in the export folder).
        card = open(sys.argv[1] + "/README.md").read()
        snippet = card.split("### onnx: ok")[1].split("```python")[1].split("```")[0]
        assert len(snippet.strip().splitlines()) == 3, snippet
        import os
        os.chdir(sys.argv[1])
        scope = {"images": x}
        exec(snippet, scope)
        assert np.array_equal(scope["logits"], got)
        heavy = [m for m in ("torch", "forge", "onnx") if m in sys.modules]
        assert not heavy, heavy
        print("ok", np.abs(got - want).max())
        """
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", client, str(out)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


# --------------------------------------------------------------------------------------------
# The gate is fatal


def _tamper_onnx(path: str) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(init).copy()
    weights.flat[0] += 0.05  # one weight, after export
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save(model, path)


def test_weights_altered_after_export_fail_the_gate_with_a_table(
    tmp_path: Path, digits_ckpt: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import forge.export.onnx as onnx_format

    original = onnx_format.write

    def write_then_tamper(*args: Any, **kwargs: Any) -> Any:
        written = original(*args, **kwargs)
        _tamper_onnx(f"{args[4]}/model.onnx")
        return written

    monkeypatch.setattr(onnx_format, "write", write_then_tamper)
    out = tmp_path / "export"
    with pytest.raises(ExportError) as info:
        forge.export(digits_ckpt, out=str(out), settings=cheap())
    text = str(info.value)
    assert "onnx: parity gate failed" in text
    assert "runtime" in text and "max_abs" in text  # the table's header
    fails = [line for line in text.splitlines() if line.endswith("FAIL")]
    assert fails and all(line.startswith("onnx[") for line in fails)
    m = manifest_of(str(out))
    assert m["formats"]["onnx"]["status"] == "parity_failed"
    assert m["formats"]["onnx"]["parity"]["max_abs"] > 1e-3
    assert "model.onnx" not in m["files"] and not (out / "model.onnx").exists()
    assert m["formats"]["torch_export"]["status"] == "ok" and (out / "model.pt2").exists()
    with pytest.raises(CheckpointError, match="parity_failed"):
        load_verified(str(out), "onnx")

    # The CLI exits non-zero and prints the table.
    from forge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "export",
                f"checkpoint={digits_ckpt}",
                f"export.out={tmp_path / 'cli'}",
                "export.formats=[onnx]",
                "export.latency_repeats=2",
            ]
        )
    assert exit_info.value.code == 1
    printed = capsys.readouterr()
    assert "FAIL" in printed.out + printed.err and "onnx[all]" in printed.out + printed.err


def test_a_format_that_cannot_express_the_model_is_named_and_the_others_still_produced(
    tmp_path: Path, digits_ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import forge.export.torch_export as te

    def unsupported(*args: Any, **kwargs: Any) -> Any:
        from forge.export.artifact import format_error

        try:
            raise RuntimeError(
                "no lowering for <OpOverload(op='aten.fft_rfft', overload='default')>"
            )
        except RuntimeError as exc:
            raise format_error("torch_export", exc) from exc

    monkeypatch.setattr(te, "write", unsupported)
    out = tmp_path / "export"
    with pytest.raises(
        ExportError, match=r"torch_export cannot express the operator aten\.fft_rfft"
    ):
        forge.export(digits_ckpt, out=str(out), settings=cheap())
    m = manifest_of(str(out))
    assert m["formats"]["torch_export"] == {
        "status": "failed",
        "op": "aten.fft_rfft",
        "error": m["formats"]["torch_export"]["error"],
    }
    assert m["formats"]["onnx"]["status"] == m["formats"]["safetensors"]["status"] == "ok"


def test_loads_only_files_that_match_the_committed_manifest(
    tmp_path: Path, digits_ckpt: str
) -> None:
    out = tmp_path / "export"
    forge.export(
        digits_ckpt,
        formats=["torch_export", "torchscript", "safetensors"],
        out=str(out),
        settings=cheap(),
    )
    golden = np.load(out / "golden.npz")
    x, want = torch.from_numpy(golden["b4/input/images"]), golden["b4/output/logits"]
    for fmt in ("torch_export", "torchscript", "safetensors"):
        got = load_verified(str(out), fmt)(x).detach().numpy()
        assert np.allclose(got, want, rtol=1e-3, atol=1e-5), fmt
    pt2 = out / "model.pt2"
    data = bytearray(pt2.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    pt2.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the export manifest"):
        load_verified(str(out), "torch_export")


def test_budgets_are_enforced_with_the_numbers(tmp_path: Path, digits_ckpt: str) -> None:
    ok = forge.export(
        digits_ckpt,
        formats=["onnx"],
        out=str(tmp_path / "a"),
        settings=cheap(max_size_mb=10, max_latency_ms=10_000),
    )
    budgets = ok.manifest["formats"]["onnx"]["budgets"]
    assert budgets["size_mb"]["limit"] == 10 and 0 < budgets["size_mb"]["actual"] < 1
    assert budgets["latency_ms"]["actual_p95"] > 0
    size = ok.manifest["files"]["model.onnx"]["size"] / 2**20
    with pytest.raises(ExportError, match=rf"size {size:.3f} MiB > export.max_size_mb=0.001"):
        forge.export(
            digits_ckpt,
            formats=["onnx"],
            out=str(tmp_path / "b"),
            settings=cheap(max_size_mb=0.001),
        )
    assert manifest_of(str(tmp_path / "b"))["formats"]["onnx"]["status"] == "over_budget"
    with pytest.raises(
        ExportError, match=r"p95 latency at batch 1 [0-9.]+ ms > export.max_latency_ms=1e-06"
    ):
        forge.export(
            digits_ckpt,
            formats=["onnx"],
            out=str(tmp_path / "c"),
            settings=cheap(max_latency_ms=1e-6),
        )


# --------------------------------------------------------------------------------------------
# Refusals and the CLI


def test_a_recipe_without_an_input_spec_is_refused(tmp_path: Path, capsys: Any) -> None:
    module = tmp_path / "bare_recipe.py"
    module.write_text(
        textwrap.dedent(
            """
        import torch
        import forge

        def build(params):
            data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
            return forge.Recipe(model=torch.nn.Linear(3, 1), train_data=data,
                                loss_fn=lambda m, b: m(b[0]).sum())
        """
        )
    )
    run = tmp_path / "run"
    state = {k: v.contiguous() for k, v in torch.nn.Linear(3, 1).state_dict().items()}
    from forge.checkpoint.serialize import tensors_to_bytes

    ckpt = CheckpointStore(str(run)).save(
        1, {"model.safetensors": tensors_to_bytes(state)}, strategy="ddp"
    )
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"recipe": {"name": "bare", "module": str(module), "kind": "loop", "params": {}}}
        )
    )
    with pytest.raises(ConfigError, match=r"gives no export input spec.*forge.Recipe\(export="):
        forge.export(ckpt.uri, settings=cheap())
    from forge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["export", f"checkpoint={ckpt.uri}"])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert "gives no export input spec" in printed.out + printed.err


def test_cli_arguments_are_validated(tmp_path: Path) -> None:
    uri, settings, options = parse(
        [
            "checkpoint=s3://bucket/runs/x",
            "export.formats=[onnx,safetensors]",
            "export.tolerance.onnx.rtol=0.01",
            "storage.endpoint_url=http://127.0.0.1:9000",
        ]
    )
    assert uri == "s3://bucket/runs/x" and settings.formats == ["onnx", "safetensors"]
    assert settings.tolerance.for_format("onnx").rtol == 0.01
    assert settings.tolerance.for_format("onnx").atol == 1e-5
    assert settings.tolerance.for_format("safetensors").rtol == 1e-3
    assert options.endpoint_url == "http://127.0.0.1:9000"
    assert parse(["checkpoint=x"])[1] == ExportSettings()  # the YAML and the code agree
    with pytest.raises(ConfigError, match="Did you mean 'formats'"):
        parse(["checkpoint=x", "export.formatz=[onnx]"])
    with pytest.raises(ConfigError, match=r"export.formats.0: .*onnxx"):
        parse(["checkpoint=x", "export.formats=[onnxx]"])
    with pytest.raises(ConfigError, match="export.batch_size"):
        parse(["checkpoint=x", "export.batch_size=1"])
    with pytest.raises(ConfigError, match="needs checkpoint="):
        parse(["export.formats=[onnx]"])
    with pytest.raises(ConfigError, match="neither a committed checkpoint"):
        forge.export(str(tmp_path / "nothing"))


# --------------------------------------------------------------------------------------------
# Where checkpoints come from: S3, sharded strategies on two ranks


@pytest.mark.s3
def test_export_from_s3_with_external_onnx_data(
    tmp_path: Path, digits_ckpt: str, s3_server: str, s3_bucket: str
) -> None:
    from forge.checkpoint.storage import StorageOptions

    options = StorageOptions(endpoint_url=s3_server)
    local_run = Path(digits_ckpt).parents[1]
    remote_run = f"{s3_bucket}/runs/digits"
    for path in local_run.rglob("*"):
        if path.is_file() and "exports" not in path.parts:
            rel = path.relative_to(local_run).as_posix()
            storage.write_bytes(storage.join(remote_run, rel), path.read_bytes(), options)
    ckpt_uri = f"{remote_run}/checkpoints/step_00000004"
    result = forge.export(
        ckpt_uri,
        formats=["onnx", "safetensors"],
        storage_options=options,
        settings=cheap(onnx_external_data_mb=0),
    )
    assert result.uri == f"{remote_run}/exports/step_00000004" and result.ok
    onnx_files = result.manifest["formats"]["onnx"]["files"]
    assert onnx_files == ["model.onnx", "model.onnx.data"]
    listed = {e["name"] for e in storage.list_dir(result.uri, options)}
    assert {"manifest.json", "model.onnx", "model.onnx.data", "golden.npz"} <= listed
    session = load_verified(result.uri, "onnx", options)  # both files verified and downloaded
    x = np.zeros((3, 1, 8, 8), dtype=np.float32)
    assert session.run(None, {"images": x})[0].shape == (3, 10)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "fsdp"])
def test_export_from_a_two_rank_sharded_checkpoint(tmp_path: Path, strategy: str) -> None:
    ckpt = train_run_multi(str(tmp_path / strategy), "tinylm", 2, f"strategy={strategy}")
    manifest = CheckpointStore(str(tmp_path / strategy)).latest().manifest
    assert manifest.world_size == 2 and "shard-00001-of-00002.safetensors" in manifest.files
    result = forge.export(ckpt, settings=cheap())
    assert result.ok and result.manifest["world_size"] == 2
    assert result.manifest["strategy"] == strategy
