"""Cluster problems found by the CLI before any worker starts (no Ray cluster needed)."""

from __future__ import annotations

import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_fails_fast_with_a_fix(tmp_path):
    port = _free_port()  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "forge", f"ray.address=127.0.0.1:{port}", f"storage.uri={tmp_path}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"nothing answers at 127.0.0.1:{port}" in proc.stderr
    assert "ray start --head" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
