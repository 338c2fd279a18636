"""Benchmark forge's strategies on one GPU against a bare PyTorch loop: tokens/s and MFU.

The model is ``recipes/tinylm.py`` at GPT-2-124M size (``experiment=tinylm_gpt2_gpu``: 12 layers,
768 wide, T=1024, bf16, AdamW, clip 1.0, batch 16 per GPU). Runs of ``--steps`` steps:

* **bare**: a single-GPU PyTorch loop written the usual way (DataLoader over the same windows,
  ``torch.autocast(bf16)``, fused AdamW, ``clip_grad_norm_``, the loss read every 10 steps), in
  this process;
* **bare_ray**: the same loop inside one Ray Train worker, placed as forge's worker is (4 CPUs,
  a GPU): what the Ray worker costs, apart from forge's loop;
* **forge ddp**, **forge deepspeed_zero2**, **forge deepspeed_zero3**: ``forge.train`` with
  ``scaling.num_workers=1`` on a local Ray cluster this script starts once.

Each side reports the median wall time between optimizer steps after ``--warmup`` steps.
tokens/s = batch x T / step time; MFU = tokens/s x (6N + 12 L d T) / 989.5e12 (H100 SXM dense
bf16 peak; ``recipes.tinylm.flops_per_token``). Targets, printed with the ratios:

* forge DDP >= 0.98x the bare loop's tokens/s (forge's loop overhead);
* MFU >= 45% for forge DDP;
* forge ZeRO-3 >= 0.9x forge DDP (on one GPU ZeRO has nothing to shard; this measures the cost
  of its machinery).

Both sides are compiled (``torch.compile`` per block, as ``trainer.compile=true`` does in forge)
unless ``--no-compile``; the comparison is like for like either way. Levers:
``--extra-batch-size 32`` (bare and forge ddp again at that batch), ``--pin-memory-also bare
ddp`` (those sides again with pinned batches). ``--profile-dir DIR`` profiles steps 16-19 of
every side (inside the warm-up, so no timed step is slowed; forge through
``trainer.profile_steps``) and prints the GPU's busy time per step against the timed step, and
the top kernels; tables, summaries and Chrome traces go to DIR.

Run it (GPU machine, from any directory, repo venv active; ``scripts/gpu_acceptance.sh`` runs it
on an offline GPU machine)::

    python scripts/bench/strategies_gpu.py                       # every side, 100 steps each
    python scripts/bench/strategies_gpu.py --steps 200 --only bare ddp
    python scripts/bench/strategies_gpu.py --peak-tflops 1979    # another peak (H100 sparse...)
    python scripts/bench/strategies_gpu.py --smoke               # CPU, tiny model: plumbing only

``--smoke`` runs every side for a few steps on the CPU with a 2-layer model (its numbers mean
nothing); it exists so the script itself is checked without a GPU
(``tests/integration/test_bench_smoke.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
H100_BF16_PEAK_TFLOPS = 989.5
TARGETS = {"ddp_vs_bare": 0.98, "mfu": 0.45, "zero3_vs_ddp": 0.9}
SIDES = ["bare", "bare_ray", "ddp", "deepspeed_zero2", "deepspeed_zero3"]
LOG_EVERY = 10  # host reads of the loss, both sides
# Profiled steps (--profile-dir), on both sides: inside the warm-up, so no timed step is slowed.
PROFILE_WINDOW = (16, 19)


# --smoke: a model small enough for a CPU, as recipe.params overrides.
SMOKE_PARAMS = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "max_files": 3}


def shape(smoke: bool) -> tuple[Any, int, float]:
    """The GPT-2-124M Params (tiny ones with ``smoke``), parameter count and FLOPs per token."""
    from omegaconf import OmegaConf

    from recipes.tinylm import Params, TinyLM, flops_per_token, num_params

    cfg = OmegaConf.load(REPO_ROOT / "configs/recipe/tinylm_gpt2.yaml")
    values = OmegaConf.to_container(cfg.params)
    assert isinstance(values, dict)
    params = Params(**{**values, **(SMOKE_PARAMS if smoke else {})})  # type: ignore[arg-type]
    n = num_params(TinyLM(params))
    return params, n, flops_per_token(params, n)


def run_bare(
    steps: int,
    warmup: int,
    batch_size: int,
    compile_model: bool,
    smoke: bool,
    pin_memory: bool = False,
    profile_dir: Path | None = None,
    side: str = "bare",
) -> float:
    """Median seconds per optimizer step of a plain single-GPU loop.

    ``pin_memory``: the DataLoader pins its batches, so the host-to-device copy of a batch
    does not wait for the GPU to finish the previous step (a pageable copy does).

    The loss is read on the host every ``LOG_EVERY`` steps, as forge's loop reads it at its log
    steps (``trainer.log_every_n_steps=10`` on the forge side): no side pays a sync per step.
    With ``profile_dir``, the steps of ``PROFILE_WINDOW`` run under ``torch.profiler`` (forge's
    :class:`forge.profiling.StepProfiler`, as ``trainer.profile_steps`` does on the forge side);
    where their time went is printed, and the profiler's table written there.
    """
    import torch
    from torch.utils.data import DataLoader

    from recipes.tinylm import TinyLM, load_corpus, loss_fn, split_corpus

    params, _, _ = shape(smoke)
    torch.manual_seed(0)
    device = torch.device("cpu" if smoke else "cuda")
    train, _ = split_corpus(load_corpus(params.max_files), params.block_size, params.val_fraction)
    loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, drop_last=True, pin_memory=pin_memory
    )
    model = TinyLM(params).to(device)
    if compile_model:
        for block in model.blocks:  # per block, exactly as forge's trainer.compile does
            block.compile()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=not smoke
    )

    def batches():
        while True:
            yield from loader

    def step(x: Any, y: Any, index: int) -> None:
        batch = (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index % LOG_EVERY == 0:
            loss.item()  # the host reads the loss at log steps, as forge does

    from forge.profiling import StepProfiler

    files: dict[str, bytes] = {}
    window = PROFILE_WINDOW if profile_dir is not None else None
    profiler = StepProfiler(window, device, files.__setitem__)
    ends: list[float] = []
    for index, (x, y) in zip(range(1, steps + 1), batches(), strict=False):
        if index - 1 == profiler.edge:
            profiler.at_step(index - 1)
        step(x, y, index)
        ends.append(time.perf_counter())
    profiler.close(steps)
    deltas = [b - a for a, b in zip(ends, ends[1:], strict=False)][warmup:]
    if profile_dir is not None:
        label = side_label(side, batch_size, pin_memory)
        table = save_profile(profile_dir, label, files)
        summary = json.loads(files["rank0.summary.json"])
        print_profile(label, summary, statistics.median(deltas), table)
    return statistics.median(deltas)  # the model is freed with this frame


def side_label(side: str, batch: int, pinned: bool) -> str:
    """How a run is named in the output: 'bare, batch 16', 'forge ddp, batch 16 pinned'."""
    who = side if side.startswith("bare") else f"forge {side}"
    return f"{who}, batch {batch}{' pinned' * pinned}"


def profile_slug(label: str) -> str:
    """A side's label as a file name: 'forge ddp, batch 16 pinned' -> 'ddp-b16-pinned'."""
    return label.replace("forge ", "").replace(", batch ", "-b").replace(" ", "-")


def save_profile(profile_dir: Path, label: str, files: dict[str, bytes]) -> Path:
    """Write a side's profiler table, summary and trace into ``profile_dir``; returns the
    table's path."""
    slug = profile_slug(label)
    (profile_dir / f"{slug}.trace.json.gz").write_bytes(files["rank0.trace.json.gz"])
    (profile_dir / f"{slug}.summary.json").write_bytes(files["rank0.summary.json"])
    table = profile_dir / f"{slug}.profile.txt"
    table.write_bytes(files["rank0.table.txt"])
    return table


def bare_in_ray_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: the bare loop as it is, its median step time to a file."""
    sys.path.insert(0, config["repo"])
    profile_dir = Path(config["profile_dir"]) if config["profile_dir"] else None
    seconds = run_bare(
        config["steps"],
        config["warmup"],
        config["batch"],
        config["compile"],
        config["smoke"],
        config["pin"],
        profile_dir,
        side="bare_ray",
    )
    Path(config["out"]).write_text(json.dumps(seconds))


def run_bare_ray(config: dict[str, Any], storage: str) -> float:
    """Median seconds per step of the bare loop inside one Ray Train worker (placed as forge's
    worker is): what the Ray worker costs, apart from forge's loop."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(storage, "bare_ray.json")
    config = {**config, "out": str(out), "repo": str(REPO_ROOT)}
    cpus = 1 if config["smoke"] else 4  # scaling=gpu: 4 CPUs and a GPU per worker
    TorchTrainer(
        bare_in_ray_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=1, use_gpu=not config["smoke"], resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(name="bare-ray", storage_path=storage),
    ).fit()
    seconds = json.loads(out.read_text())
    if config["profile_dir"]:  # the worker's own output goes to Ray's logs, not here
        label = side_label("bare_ray", config["batch"], config["pin"])
        slug = profile_slug(label)
        summary = json.loads(Path(config["profile_dir"], f"{slug}.summary.json").read_text())
        print_profile(label, summary, seconds, Path(config["profile_dir"], f"{slug}.profile.txt"))
    return seconds


def print_profile(label: str, summary: dict[str, Any], step_s: float, table: Path) -> None:
    """One side's profile: the GPU's busy time per step against the unprofiled step time (the
    profiler slows the host, so its own wall time overstates host gaps), and the top ops."""
    busy = summary["device_busy_ms_per_step"]
    timed_ms = step_s * 1e3
    where = (
        f"GPU busy {busy:.1f} ms of the {timed_ms:.1f} ms timed step (idle "
        f"{max(0.0, timed_ms - busy):.1f} ms)"
        if busy is not None
        else "CPU run"
    )
    print(
        f"profile of {label} ({summary['steps']} steps): {where}; under the profiler "
        f"{summary['wall_ms_per_step']:.1f} ms/step; table: {table.name}",
        flush=True,
    )
    for op in summary["top"][:8]:
        print(f"  {op['share']:6.1%} {op['ms_per_step']:8.2f} ms  {op['name'][:90]}", flush=True)


def forge_overrides(
    strategy: str,
    steps: int,
    batch_size: int,
    compile_model: bool,
    smoke: bool,
    pin_memory: bool,
    profile: Path | None,
) -> list[str]:
    """The ``forge.train`` overrides of one forge side."""
    overrides = [
        "experiment=tinylm_gpt2_gpu",
        f"strategy={strategy}",
        "scaling.num_workers=1",
        f"data.batch_size={batch_size}",
        f"trainer.max_steps={steps}",
        f"trainer.compile={str(compile_model).lower()}",
        f"trainer.log_every_n_steps={LOG_EVERY}",
        "checkpoint.every_n_steps=0",
        "trainer.val_every_n_steps=0",
        f"data.pin_memory={str(pin_memory).lower()}",
    ]
    if profile:
        overrides.append(f"trainer.profile_steps=[{PROFILE_WINDOW[0]},{PROFILE_WINDOW[1]}]")
    if smoke:
        overrides += ["scaling=cpu", "scaling.num_workers=1", "scaling.cpus_per_worker=1"]
        overrides += [f"recipe.params.{k}={v}" for k, v in SMOKE_PARAMS.items()]
    return overrides


def parse_variants(specs: list[str]) -> dict[str, tuple[str, list[str]]]:
    """``--variant`` values as {label: (strategy, overrides)}.

    Example:
        >>> parse_variants(["zero3_eager=deepspeed_zero3:trainer.compile=false"])
        {'zero3_eager': ('deepspeed_zero3', ['trainer.compile=false'])}

    Raises:
        ValueError: A value is not ``LABEL=STRATEGY[:k=v,...]``, or a label is a side's name.
    """
    out: dict[str, tuple[str, list[str]]] = {}
    for spec in specs:
        label, eq, rest = spec.partition("=")
        strategy, _, overrides = rest.partition(":")
        if not eq or not label or not strategy or label in SIDES or label in out:
            raise ValueError(
                f"--variant {spec!r}: expected LABEL=STRATEGY[:k=v,...] with a new label that "
                f"is not one of {', '.join(SIDES)}, e.g. "
                "zero3_eager=deepspeed_zero3:trainer.compile=false"
            )
        out[label] = (strategy, [o for o in overrides.split(",") if o])
    return out


def run_forge(
    overrides: list[str], address: str, storage: str, label: str, profile_dir: Path | None
) -> float:
    """Median seconds per optimizer step of forge.train (after its warm-up steps); with
    ``profile_dir``, prints the run's profile and copies its table there."""
    from rich.console import Console

    import forge

    result = forge.train(
        [*overrides, f"ray.address={address}", f"storage.uri={storage}"],
        console=Console(file=open(os.devnull, "w")),
    )
    if result.step_time_s is None:
        raise RuntimeError(f"forge.train ({shlex.join(overrides)}) returned no step time")
    if profile_dir is not None:
        folder = Path(result.run_dir, "profile")
        files = {f.name: f.read_bytes() for f in folder.iterdir()}
        table = save_profile(profile_dir, label, files)
        summary = json.loads(files["rank0.summary.json"])
        print_profile(label, summary, result.step_time_s, table)
    # Training ends with a final checkpoint and validation, outside the timed steps.
    return result.step_time_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20, help="steps not timed (forge: 20)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences of T=1024 per step")
    parser.add_argument("--only", nargs="+", choices=SIDES, default=SIDES)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile every block, on both sides (default: on)",
    )
    parser.add_argument(
        "--extra-batch-size",
        type=int,
        nargs="*",
        default=[],
        help="also run bare and forge ddp at these batch sizes (the MFU lever)",
    )
    parser.add_argument(
        "--pin-memory-also",
        nargs="*",
        choices=["bare", "ddp"],
        default=[],
        help="also run these sides with pinned batches (forge: data.pin_memory=true)",
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        help=f"profile steps {PROFILE_WINDOW[0]}-{PROFILE_WINDOW[1]} of every side (in the "
        "warm-up); print where the time went, write each side's profiler table here",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=STRATEGY[:k=v,...]",
        help="also run forge with this strategy and these overrides, as a side named LABEL; "
        "repeatable (e.g. zero3_eager=deepspeed_zero3:trainer.compile=false)",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps")
    args = parser.parse_args()
    try:
        variants_by_label = parse_variants(args.variant)
    except ValueError as exc:
        parser.error(str(exc))
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.compile = 24, 20, 2, False
    if args.steps <= args.warmup + 1:
        parser.error(f"--steps must exceed the {args.warmup} warm-up steps")
    if args.profile_dir is not None:
        if args.warmup < PROFILE_WINDOW[1]:
            parser.error(
                f"--profile-dir profiles steps up to {PROFILE_WINDOW[1]}: --warmup >= that"
            )
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    print("command:", shlex.join(sys.orig_argv), flush=True)

    sys.path.insert(0, str(REPO_ROOT))  # forge and recipes, here and in the Ray workers
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
    )
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("strategies_gpu.py needs a CUDA GPU (it measures bf16 MFU); none found.")
        return 2
    params, n_params, flops = shape(args.smoke)
    tokens_per_step = args.batch_size * params.block_size  # type: ignore[attr-defined]
    print(
        f"model: {n_params / 1e6:.1f}M params, {flops / 1e9:.3f} GFLOP/token, "
        f"{tokens_per_step} tokens/step, compile {args.compile}, "
        f"{'CPU smoke run' if args.smoke else 'GPU ' + torch.cuda.get_device_name()}",
        flush=True,
    )

    # (side, batch size, pinned) -> seconds per step; a side that fails is reported and
    # skipped, so one broken strategy does not cost the GPU session the others' numbers.
    step_s: dict[tuple[str, int, bool], float] = {}
    failed: list[str] = []
    runs = [(side, args.batch_size, False) for side in args.only]
    for extra in args.extra_batch_size:
        runs += [(side, extra, False) for side in ("bare", "ddp")]
    runs += [(side, args.batch_size, True) for side in args.pin_memory_also]
    runs += [(label, args.batch_size, False) for label in variants_by_label]
    variants = list(dict.fromkeys((batch, pin) for _, batch, pin in runs))

    for batch, pin in variants:
        if ("bare", batch, pin) not in runs:
            continue
        key = ("bare", batch, pin)
        step_s[key] = run_bare(
            args.steps, args.warmup, batch, args.compile, args.smoke, pin, args.profile_dir
        )
        print(f"{side_label(*key)}: {step_s[key] * 1e3:.1f} ms/step", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    forge_runs = [run for run in runs if run[0] != "bare"]  # bare_ray too: it needs Ray
    if forge_runs:
        import ray

        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        address = ray.get_runtime_context().gcs_address
        with tempfile.TemporaryDirectory(prefix="forge-bench-") as storage:
            for strategy, batch, pin in forge_runs:
                if strategy == "bare_ray":
                    config = {
                        "steps": args.steps,
                        "warmup": args.warmup,
                        "batch": batch,
                        "compile": args.compile,
                        "smoke": args.smoke,
                        "pin": pin,
                        "profile_dir": str(args.profile_dir) if args.profile_dir else None,
                    }
                    key = (strategy, batch, pin)
                    step_s[key] = run_bare_ray(config, f"{storage}/bare-ray-{batch}-{pin}")
                    print(f"{side_label(*key)}: {step_s[key] * 1e3:.1f} ms/step", flush=True)
                    continue
                name, extra = variants_by_label.get(strategy, (strategy, []))
                overrides = forge_overrides(
                    name, args.steps, batch, args.compile, args.smoke, pin, args.profile_dir
                )
                overrides += extra  # a --variant's own overrides win (last one counts)
                label = side_label(strategy, batch, pin)
                folder = f"{storage}/{strategy}-{batch}-{pin}"
                try:
                    seconds = run_forge(overrides, address, folder, label, args.profile_dir)
                except Exception as exc:  # reported; the other sides still run
                    failed.append(f"{label}: {type(exc).__name__}: {exc}")
                    print(f"{label}: FAILED ({type(exc).__name__}: {exc})", flush=True)
                    continue
                step_s[(strategy, batch, pin)] = seconds
                print(f"{label}: {seconds * 1e3:.1f} ms/step", flush=True)
        ray.shutdown()

    peak = args.peak_tflops * 1e12
    print(f"\n{'run':<24}{'batch':>6}{'pinned':>7}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}")
    tps: dict[tuple[str, int, bool], float] = {}
    for (side, batch, pin), seconds in step_s.items():
        tps[(side, batch, pin)] = batch * params.block_size / seconds  # type: ignore[attr-defined]
        mfu = tps[(side, batch, pin)] * flops / peak
        label = side if side.startswith("bare") else f"forge {side}"
        print(
            f"{label:<24}{batch:>6}{'yes' if pin else 'no':>7}{seconds * 1e3:>10.1f}"
            f"{tps[(side, batch, pin)]:>12,.0f}{mfu:>8.1%}"
        )
    print("\nratios of tokens/s: above 1 the first is faster")
    checks = []
    for batch, pin in variants:
        ddp, bare = tps.get(("ddp", batch, pin)), tps.get(("bare", batch, pin))
        zero2 = tps.get(("deepspeed_zero2", batch, pin))
        zero3 = tps.get(("deepspeed_zero3", batch, pin))
        at = f" (batch {batch}{', pinned' * pin})"
        if ddp and bare:
            checks.append(("forge ddp / bare" + at, ddp / bare, TARGETS["ddp_vs_bare"]))
        if ddp:
            checks.append(("forge ddp MFU" + at, ddp * flops / peak, TARGETS["mfu"]))
        if ddp and zero3:
            checks.append(("forge zero3 / forge ddp" + at, zero3 / ddp, TARGETS["zero3_vs_ddp"]))
        if ddp and zero2:
            print(f"forge zero2 / forge ddp{at}: {zero2 / ddp:.3f} (tokens/s; no target)")
        bare_ray = tps.get(("bare_ray", batch, pin))
        if bare_ray and bare:  # what the Ray worker costs, and what forge's loop costs in it
            print(f"bare in a Ray worker / bare{at}: {bare_ray / bare:.3f} (tokens/s; no target)")
        if bare_ray and ddp:
            print(
                f"forge ddp / bare in a Ray worker{at}: {ddp / bare_ray:.3f} (tokens/s; no target)"
            )
        for label in variants_by_label:
            variant = tps.get((label, batch, pin))
            if variant and ddp:
                print(f"forge {label} / forge ddp{at}: {variant / ddp:.3f} (tokens/s; no target)")
    for line in failed:
        print("FAILED", line)
    if args.smoke:
        print("smoke run: the script works end to end; its numbers are not measurements")
        return 1 if failed else 0
    for label, value, target in checks:
        verdict = "ok" if value >= target else "BELOW TARGET"
        print(f"{label}: {value:.3f} (target >= {target}) {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
