"""The GPU benchmark script runs end to end (``--smoke``: CPU, tiny model), so a GPU session
spends its time measuring, not debugging the script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_strategies_gpu_bench_smoke() -> None:
    """~90 s: the bare loop, then forge ddp / ZeRO-2 / ZeRO-3 and a --variant side on an embedded
    Ray of its own."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts/bench/strategies_gpu.py"),
            "--smoke",
            "--variant",
            "ddp_log1=ddp:trainer.log_every_n_steps=1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for side in ("bare", "forge ddp", "forge deepspeed_zero2", "forge deepspeed_zero3"):
        assert side in result.stdout
    assert "forge zero2 / forge ddp" in result.stdout and "smoke run:" in result.stdout
    assert "forge ddp_log1 / forge ddp" in result.stdout  # a --variant side, and its ratio


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT
    )


@pytest.mark.slow
def test_ddp_overhead_guard_checks_each_ratio_against_its_own_limit() -> None:
    """~1-2 min: the guard's plumbing. The paired per-step limit no run can meet fails it, by
    name; the loose first-step limit passes (the real limits are a measurement, by hand)."""
    result = run_bench(
        "scripts/bench/ddp_overhead.py", "--guard", "--paired", "2", "--steps", "25",
        "--repeats", "1", "--max-ratio", "0.01", "--max-first-step", "100",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "paired, 2 rounds" in result.stdout and "forge / baseline" in result.stdout
    assert "GUARD FAILED: per-step (paired) ratio" in result.stdout
    assert "GUARD FAILED: time to first step" not in result.stdout


@pytest.mark.slow
def test_checkpoint_stream_guard_exits_non_zero_past_a_limit() -> None:
    """~30 s: a throughput limit no run can meet makes the guard fail, naming the ratio."""
    result = run_bench(
        "scripts/bench/checkpoint_stream.py", "--guard", "--size-mb", "20", "--repeats", "2",
        "--min-throughput", "1000",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "GUARD FAILED: throughput ratio" in result.stdout
    assert "1. blocked per checkpoint" in result.stdout
