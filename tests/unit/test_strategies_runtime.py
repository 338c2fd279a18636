"""Every strategy in one process (world size 1, an in-process gloo group): same losses,
checkpoints that every other strategy resumes exactly, consolidation, activation checkpointing.

Multi-worker runs (2 and 3 workers, resharding) are in tests/integration/test_strategies.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from forge.checkpoint import consolidate
from forge.checkpoint.store import CheckpointStore
from forge.config.compose import compose
from forge.config.specs import LaunchPlan
from forge.config.validate import to_run_spec
from forge.errors import CheckpointError, ConfigError
from forge.loop import WorkerContext, run_loop
from forge.strategies.fragments import ShardWriter, StateReader

ALL = ["ddp", "fsdp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"]


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """The in-process group the strategies create lives for this module (DeepSpeed caches its
    groups), and is gone after it; so are DeepSpeed's launcher variables."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def one_worker_env(monkeypatch: pytest.MonkeyPatch, one_torch_thread: None) -> None:
    """DeepSpeed's launcher variables for a world of one, and one torch thread."""
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)


def digits(storage: Path, *overrides: str):
    return to_run_spec(
        compose(
            [
                "experiment=digits",
                f"storage.uri={storage}",
                "trainer.max_steps=8",
                "trainer.log_every_n_steps=1",
                "trainer.val_every_n_steps=0",
                "checkpoint.every_n_steps=4",
                "checkpoint.keep_last=null",
                "data.batch_size=32",
                "recipe.params.channels=4",
                "recipe.params.dropout=0.0",
                "optim.scheduler=constant",
                "trainer.gradient_clip_val=1.0",
                *overrides,
            ]
        )
    )


def tinylm(storage: Path, *overrides: str):
    return to_run_spec(
        compose(
            [
                "experiment=tinylm",
                f"storage.uri={storage}",
                "trainer.max_steps=4",
                "trainer.log_every_n_steps=1",
                "trainer.val_every_n_steps=0",
                "checkpoint.every_n_steps=0",
                "data.batch_size=4",
                "recipe.params.max_files=2",
                "recipe.params.n_layer=2",
                "recipe.params.n_embd=32",
                "recipe.params.block_size=32",
                *overrides,
            ]
        )
    )


def plan(run_uri: Path, resume_from: str | None = None) -> LaunchPlan:
    return LaunchPlan(
        run_uri=str(run_uri), resume_from=resume_from, config_hash="x", launch_time=time.time()
    )


def losses(run_uri: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_uri / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_every_strategy_gives_the_same_losses(tmp_path: Path) -> None:
    curves = {}
    for name in ALL:
        events: list[dict[str, Any]] = []
        run_loop(
            digits(tmp_path, f"strategy={name}"),
            plan(tmp_path / name),
            WorkerContext(on_progress=events.append),
        )
        curves[name] = losses(tmp_path / name)
        info = [e["message"] for e in events if e["event"] == "info"]
        assert info[0].startswith(f"memory per worker ({name}, 1 workers")
        assert info[-1].startswith("peak memory per worker")
    for name in ALL:
        assert curves[name] == pytest.approx(curves["ddp"], abs=1e-6), name


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ("ddp", "deepspeed_zero3"),
        ("deepspeed_zero3", "fsdp"),
        ("fsdp", "deepspeed_zero1"),
        ("deepspeed_zero2", "ddp"),
    ],
)
def test_a_checkpoint_resumes_exactly_under_another_strategy(
    tmp_path: Path, source: str, target: str
) -> None:
    """8 steps of ``source`` == its step-4 checkpoint continued by ``target`` (model, Adam
    moments and step, learning rate, data position all restored)."""
    run_loop(digits(tmp_path, f"strategy={source}"), plan(tmp_path / "src"), WorkerContext())
    manifest = json.loads((tmp_path / "src/checkpoints/step_00000004/manifest.json").read_text())
    assert manifest["strategy"] == source and manifest["world_size"] == 1
    events: list[dict[str, Any]] = []
    run_loop(
        digits(tmp_path, f"strategy={target}"),
        plan(tmp_path / "dst", resume_from=str(tmp_path / "src/checkpoints/step_00000004")),
        WorkerContext(on_progress=events.append),
    )
    assert [e["step"] for e in events if e["event"] == "resumed"] == [4]
    assert losses(tmp_path / "dst") == pytest.approx(losses(tmp_path / "src")[4:], abs=1e-6)


def fp16(spec: Any) -> Any:
    """``spec`` with trainer.precision=fp16. The config check refuses fp16 without a GPU (CPU
    fp16 kernels are slow and some are missing), but the scaler logic is device-agnostic and
    torch runs fp16 autocast on CPU, so the unit tests take the check out of the way."""
    return spec.model_copy(
        update={"trainer": spec.trainer.model_copy(update={"precision": "fp16"})}
    )


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_fp16_scales_the_loss_and_resumes_with_the_scale(tmp_path: Path, name: str) -> None:
    """fp16 steps go through a GradScaler whose scale is checkpointed: the curve follows fp32's,
    and a run resumed at step 4 continues with exactly the losses (and scale) of the
    uninterrupted run.

    Plain SGD without clipping, so that the gradient's scale reaches the weights: clipping and
    AdamW would absorb gradients left 65536x too large. Tolerance 1e-3: fp16 matmuls
    accumulate in fp32, so the loss moves by ~1e-4 here (measured); a missing unscale or a
    skipped step moves it by far more.
    """
    sgd = (f"strategy={name}", "optim.name=sgd", "optim.lr=0.1", "trainer.gradient_clip_val=null")
    run_loop(digits(tmp_path, *sgd), plan(tmp_path / "fp32"), WorkerContext())
    run_loop(fp16(digits(tmp_path, *sgd)), plan(tmp_path / "src"), WorkerContext())
    curve = losses(tmp_path / "src")
    assert curve == pytest.approx(losses(tmp_path / "fp32"), abs=1e-3)
    step4 = tmp_path / "src/checkpoints/step_00000004"
    scaler = json.loads((step4 / "grad_scaler.json").read_text())
    assert scaler["scale"] == 2.0**16 and scaler["_growth_tracker"] == 4  # 4 unskipped steps

    run_loop(
        fp16(digits(tmp_path, *sgd)),
        plan(tmp_path / "dst", resume_from=str(step4)),
        WorkerContext(),
    )
    assert losses(tmp_path / "dst") == pytest.approx(curve[4:], abs=1e-6)
    final = "checkpoints/step_00000008/grad_scaler.json"
    assert json.loads((tmp_path / "dst" / final).read_text()) == json.loads(
        (tmp_path / "src" / final).read_text()
    )


def test_fsdp_fp16_builds_an_optimizer_its_sharded_scaler_can_step(tmp_path: Path) -> None:
    """FSDP + fp16 + AdamW: PyTorch's fused Adam fails at the first step under
    ShardedGradScaler ("output with shape [] doesn't match the broadcast shape [1]", seen on an
    H200), so FSDP asks the factory for the unfused kernels. The factory here fuses whenever
    it may, as forge's does on CUDA, so the CPU test fails the way the GPU run did."""
    from forge.optim import make_optimizer
    from forge.strategies import make_strategy

    spec = fp16(digits(tmp_path, "strategy=fsdp", "optim.name=adamw"))
    strategy = make_strategy(spec, 0, 1, torch.device("cpu"))
    asked: list[bool | None] = []

    def fusing_factory(params: Any, *, fused: bool | None = None) -> torch.optim.Optimizer:
        asked.append(fused)
        return make_optimizer(spec.optim, params, fused=True if fused is None else fused)

    layer = torch.nn.Linear(4, 2, bias=False)
    model, optimizer = strategy.setup(torch.nn.Sequential(layer), fusing_factory)
    assert asked == [False]
    # (an fp32 loss, as autocast gives: 65536, the initial scale, is inf in fp16)
    strategy.backward(model, model(torch.ones(3, 4)).float().mean(), 1)
    strategy.optimizer_step(model, optimizer, clip_norm=1.0)  # raised before the fix
    assert optimizer.state_dict()["state"][0]["step"] == 1


def test_fp16_overflow_skips_the_step_and_backs_off() -> None:
    """An inf gradient leaves the weights untouched and halves the scale; 32/bf16 never scale."""
    from forge.precision import grad_scaler, scaled_step

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    scaler = grad_scaler("fp16", torch.device("cpu"))
    scaler.scale(torch.tensor(float("inf")) * model(torch.ones(1, 4)).sum()).backward()
    scale = scaler.get_scale()
    scaled_step(scaler, model.parameters(), optimizer, clip_norm=1.0)
    assert torch.equal(model.weight, before)
    assert scaler.get_scale() == scale / 2
    assert model.weight.grad is None
    assert grad_scaler("bf16", torch.device("cpu")).state_dict() == {}


def test_consolidate_gives_one_full_state_dict_for_every_strategy(tmp_path: Path) -> None:
    from recipes.tinylm import Params, TinyLM

    states = {}
    for name in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        run_loop(tinylm(tmp_path, f"strategy={name}"), plan(tmp_path / name), WorkerContext())
        states[name] = consolidate(CheckpointStore(str(tmp_path / name)).latest().uri)
    model = TinyLM(Params(n_layer=2, n_embd=32, block_size=32))
    for name, state in states.items():
        assert state.keys() == model.state_dict().keys(), name  # tied head.weight included
        model.load_state_dict(state)
        for key, value in state.items():
            assert value.dtype == torch.float32
            assert torch.allclose(value, states["ddp"][key], atol=1e-6), (name, key)


def test_zero_init_builds_the_model_partitioned_and_trains_the_same(tmp_path: Path) -> None:
    """strategy.zero_init=true: every parameter is a ZeRO-3 partition from the moment it is
    built (nothing held whole), and the run matches DDP, weights included."""
    from forge.loop import build_recipe
    from forge.strategies import make_strategy

    spec = tinylm(tmp_path, "strategy=deepspeed_zero3", "strategy.zero_init=true")
    strategy = make_strategy(spec, 0, 1, torch.device("cpu"))
    with strategy.init_context():
        model = build_recipe(spec).build_model()
    params = list(model.parameters())
    assert params and all(hasattr(p, "ds_id") and p.data.numel() == 0 for p in params)

    run_loop(tinylm(tmp_path, "strategy=ddp"), plan(tmp_path / "ddp"), WorkerContext())
    run_loop(spec, plan(tmp_path / "zero-init"), WorkerContext())
    assert losses(tmp_path / "zero-init") == pytest.approx(losses(tmp_path / "ddp"), abs=1e-5)
    ddp = consolidate(CheckpointStore(str(tmp_path / "ddp")).latest().uri)
    zero = consolidate(CheckpointStore(str(tmp_path / "zero-init")).latest().uri)
    for key, value in ddp.items():
        assert torch.allclose(zero[key], value, atol=1e-5), key


def test_zero_init_needs_a_model_factory(tmp_path: Path) -> None:
    spec = digits(tmp_path, "strategy=deepspeed_zero3", "strategy.zero_init=true")
    with pytest.raises(ConfigError, match=r"Recipe.model as a function"):
        run_loop(spec, plan(tmp_path / "run"), WorkerContext())


def test_activation_checkpointing_recomputes_each_block(tmp_path: Path) -> None:
    """With it on, every block runs twice per micro-batch (forward, then recompute in backward)."""
    import recipes.tinylm as tinylm_recipe

    calls = {"n": 0}
    original = tinylm_recipe.Block.forward

    def counting(self: Any, x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return original(self, x)

    per_run = {}
    try:
        tinylm_recipe.Block.forward = counting  # type: ignore[method-assign]
        for name in ("ddp", "fsdp", "deepspeed_zero3"):
            for ac in ("false", "true"):
                calls["n"] = 0
                run_loop(
                    tinylm(
                        tmp_path,
                        f"strategy={name}",
                        f"strategy.activation_checkpointing={ac}",
                        "recipe.params.val_fraction=0.5",
                    ),
                    plan(tmp_path / f"{name}-{ac}"),
                    WorkerContext(),
                )
                per_run[(name, ac)] = calls["n"]
                assert losses(tmp_path / f"{name}-{ac}") == pytest.approx(
                    losses(tmp_path / "ddp-false"), abs=1e-5
                )
    finally:
        tinylm_recipe.Block.forward = original  # type: ignore[method-assign]
    for name in ("ddp", "fsdp", "deepspeed_zero3"):
        train_calls = 4 * 2  # 4 steps x 2 blocks
        assert per_run[(name, "true")] - per_run[(name, "false")] == train_calls, per_run


def test_activation_checkpointing_needs_blocks(tmp_path: Path) -> None:
    spec = digits(tmp_path, "strategy.activation_checkpointing=true")  # a CNN: no ModuleList
    with pytest.raises(ConfigError, match="strategy.block_classes"):
        run_loop(spec, plan(tmp_path / "run"), WorkerContext())
    spec = digits(tmp_path, "strategy=fsdp", "strategy.block_classes=[Nope]")
    with pytest.raises(ConfigError, match=r"matches no module.*Conv2d"):
        run_loop(spec, plan(tmp_path / "run2"), WorkerContext())


def test_fragments_assemble_any_range_from_any_split(tmp_path: Path) -> None:
    """Two writers split a 7x3 tensor unevenly (FSDP-style rows), a third holds a buffer; any
    range reads back exactly, and a missing piece is an error, not zeros."""
    full = torch.arange(21, dtype=torch.float32).reshape(7, 3)
    w0, w1 = ShardWriter(0, 2), ShardWriter(1, 2)
    w0.add("model/w", full[:4], shape=(7, 3), start=0)
    w1.add("model/w", full[4:], shape=(7, 3), start=12)
    w0.add_whole("model/buf", torch.ones(2))
    w0.meta["aliases"] = {"tied": "w"}
    files = {n: f() for w in (w0, w1) for n, f in w.files().items()}
    ckpt = CheckpointStore(str(tmp_path)).save(1, files, strategy="fsdp", world_size=2)
    reader = StateReader(ckpt)
    assert torch.equal(reader.full("model/w"), full)
    assert torch.equal(reader.read("model/w", 10, 5), full.reshape(-1)[10:15])  # spans both
    assert torch.equal(reader.full("model/tied"), full)  # tied name resolved
    assert consolidate(ckpt.uri).keys() == {"w", "buf", "tied"}

    only_first = {n: b for n, b in files.items() if "00000" in n}
    partial = CheckpointStore(str(tmp_path / "p")).save(1, only_first, strategy="fsdp")
    with pytest.raises(CheckpointError, match=r"only partly stored \(3 of 5"):
        StateReader(partial).read("model/w", 9, 5)


def test_shards_are_memory_mapped_and_remote_ones_cleaned_up(tmp_path: Path) -> None:
    """Local shards are read in place (verified, never copied); remote ones are downloaded
    once into a temporary folder that closing the reader deletes. A shard whose bytes differ
    from the manifest is refused, not read."""
    w0, w1 = ShardWriter(0, 2), ShardWriter(1, 2)
    w0.add("model/w", torch.zeros(6), shape=(12,), start=0)
    w1.add("model/w", torch.ones(6), shape=(12,), start=6)
    files = {n: f() for w in (w0, w1) for n, f in w.files().items()}

    local = CheckpointStore(str(tmp_path / "local")).save(1, files, strategy="fsdp")
    with StateReader(local) as reader:
        assert reader.read("model/w", 4, 4).tolist() == [0.0, 0.0, 1.0, 1.0]
        assert reader._workdir is None

    remote = CheckpointStore("memory://test-lazy/run").save(1, files, strategy="fsdp")
    reader = StateReader(remote)
    assert reader.read("model/w", 5, 2).tolist() == [0.0, 1.0]
    workdir = Path(str(reader._workdir))
    assert sorted(p.name for p in workdir.iterdir()) == [
        "shard-00000-of-00002.safetensors",
        "shard-00001-of-00002.safetensors",
    ]
    reader.close()
    assert not workdir.exists()

    shard = tmp_path / "local/checkpoints/step_00000001/shard-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        StateReader(local).read("model/w", 4, 4)


@pytest.mark.slow
def test_compile_keeps_names_and_losses(tmp_path: Path) -> None:
    """trainer.compile=true (per block, before sharding) trains the same and checkpoints under
    the same names, so compiled and eager runs resume each other. ~40 s: inductor on CPU."""
    run_loop(tinylm(tmp_path, "strategy=fsdp"), plan(tmp_path / "eager"), WorkerContext())
    for name in ("ddp", "fsdp"):
        run_dir = tmp_path / f"compiled-{name}"
        run_loop(
            tinylm(tmp_path, f"strategy={name}", "trainer.compile=true"),
            plan(run_dir),
            WorkerContext(),
        )
        assert losses(run_dir) == pytest.approx(losses(tmp_path / "eager"), abs=1e-4)
        state = consolidate(CheckpointStore(str(run_dir)).latest().uri)
        assert not any("_orig_mod" in key for key in state)
