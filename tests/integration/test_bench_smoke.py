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
    """~80 s: the bare loop, then forge ddp / ZeRO-2 / ZeRO-3 on an embedded Ray of its own."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts/bench/strategies_gpu.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for side in ("bare", "forge ddp", "forge deepspeed_zero2", "forge deepspeed_zero3"):
        assert side in result.stdout
    assert "forge zero2 / forge ddp" in result.stdout and "smoke run:" in result.stdout
