"""A real 2-node Ray cluster with Ray's job server, started with ``ray start`` (tests, bench).

``ray start --head`` with the dashboard (its job server) on 127.0.0.1 and a second raylet,
both with ``RAY_AUTH_MODE=token``, in a temp dir of their own and on free ports. Ray's
daemons detach from ``ray start``; ``close`` finds them by that temp dir in their command
lines and ends them by PID (``ray stop`` would end every Ray process of this user).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from moto_server import free_port

RAY = str(Path(sys.executable).with_name("ray"))


class RayJobsCluster:
    """``.url`` (job server), ``.address`` (GCS), ``.token``; ``close()`` ends it."""

    def __init__(self, num_cpus: int = 2, token: str | None = None) -> None:
        # Short path: Ray's unix sockets live under it (limit ~107 characters).
        self.temp_dir = tempfile.mkdtemp(prefix="fjc-", dir="/tmp")
        self.token = token or secrets.token_hex(16)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # A job's entrypoint runs `python -m forge` by PATH, as on a real cluster: there
            # this test's interpreter (its venv) is the cluster's Python.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        gcs, dash = free_port(), free_port()
        self.address = f"127.0.0.1:{gcs}"
        self.url = f"http://127.0.0.1:{dash}"
        common = [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        try:
            self._ray(
                "start",
                "--head",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                "--include-dashboard=true",
                f"--ray-client-server-port={free_port()}",
                *common,
            )
            self._ray("start", f"--address={self.address}", *common)
            self._wait_for_job_server()
        except BaseException:
            self.close()
            raise

    def _ray(self, *args: str) -> None:
        done = subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=180
        )
        if done.returncode:
            raise RuntimeError(f"ray {args[0]} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")

    def _wait_for_job_server(self, timeout_s: float = 120) -> None:
        request = urllib.request.Request(
            f"{self.url}/api/jobs/", headers={"Authorization": f"Bearer {self.token}"}
        )
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5):
                    return
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)

    def pids(self) -> list[int]:
        """PIDs of this cluster's processes: those whose command line names its temp dir."""
        import psutil

        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(self.temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc.info["pid"])
                try:  # and what they started: job drivers, Train workers
                    found += [c.pid for c in proc.children(recursive=True)]
                except psutil.NoSuchProcess:
                    pass
        return sorted(set(found))

    def close(self) -> None:
        import psutil

        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            _, alive = psutil.wait_procs([p for p in map(_proc, pids) if p is not None], timeout=10)
            if not alive:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _proc(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
