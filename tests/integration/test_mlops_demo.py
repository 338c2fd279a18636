"""scripts/mlops_demo.py end to end (slow: two training runs, two scoring jobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]


def test_mlops_demo(tmp_path):
    out, cwd = tmp_path / "demo", tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "mlops_demo.py"), "--out", str(out)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    drift = json.loads((out / "reports" / "drift-2" / "drift.json").read_text())
    assert drift["drift"] and "discount_rate" in drift["drifted_features"]
    assert (out / "reports" / "drift-2" / "report.html").stat().st_size > 10_000
    actions = [
        json.loads(p.read_text())["action"]
        for p in sorted((out / "registry" / "shop" / "audit").glob("*.json"))
    ]
    assert (
        "retrain" in actions and actions.count("promote") >= 3
    )  # champion, challenger, new champion
    assert list(cwd.iterdir()) == []  # everything went under --out
