"""A local 2-node Ray cluster of real ``ray start`` processes, with the job server (dashboard).

Plain module (no pytest): ``tests/conftest.py`` builds the ``ray_job_cluster`` fixture on it and
``scripts/bench/submit_overhead.py`` imports it with ``tests/`` on ``sys.path``.

Each node is its own ``ray start --block`` process with its own ``--temp-dir`` and ports, so the
cluster is torn down by those processes' ids (never ``ray stop``, which would stop every Ray on
the machine, the other tests' and other users' included). Token authentication is on, with a
token that only these processes and the caller know.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from moto_server import free_port

RAY = str(Path(sys.executable).with_name("ray"))


class RayJobCluster:
    """A head (GCS, dashboard with the job server) and a second raylet, on 127.0.0.1.

    Attributes:
        address: The GCS address (``127.0.0.1:<port>``), for ``ray.address=``.
        dashboard: The job server's URL (``http://127.0.0.1:<port>``), for ``forge submit``.
        token: The cluster's auth token; give it to clients as ``RAY_AUTH_TOKEN``.
    """

    def __init__(self, cpus_per_node: int = 2, env: dict[str, str] | None = None) -> None:
        self.token = secrets.token_hex(16)
        # A short root: Ray's socket paths must stay under the 107-byte AF_UNIX limit.
        self.root = tempfile.mkdtemp(prefix="fjc-", dir="/tmp")
        self.env = {
            **os.environ,
            **(env or {}),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # Jobs stop gracefully: forge releases its run lock on SIGTERM.
            "RAY_JOB_STOP_WAIT_TIME_S": "20",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        port, dash = free_port(), free_port()
        self.address = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        try:
            self._start(
                "head",
                [
                    "--head",
                    f"--port={port}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}",
                    "--include-dashboard=true",
                ],
                cpus_per_node,
            )
            self._wait_for_dashboard()
            self._start("worker", [f"--address={self.address}"], cpus_per_node)
            self._wait_for_nodes(2)
        except BaseException:
            self.kill()
            raise

    def _start(self, name: str, args: list[str], cpus: int) -> None:
        ports = [
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
        ]
        if name == "head":
            ports += [
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}",
            ]
        else:
            ports += [
                f"--dashboard-agent-listen-port={free_port()}",
                f"--metrics-export-port={free_port()}",
            ]
        log = open(os.path.join(self.root, f"{name}.log"), "wb")  # noqa: SIM115
        cmd = [RAY, "start", "--block", f"--num-cpus={cpus}", "--disable-usage-stats", *args]
        if name == "head":
            cmd.append(f"--temp-dir={self.root}/ray")
        cmd += ports
        # Own process group: teardown signals this node's processes and nothing else.
        self.procs.append(
            subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log, start_new_session=True)
        )

    def _wait_for_dashboard(self, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while True:
            req = urllib.request.Request(
                self.dashboard + "/api/version",
                headers={"Authorization": f"Bearer {self.token}"},
            )
            try:
                urllib.request.urlopen(req, timeout=2).close()
                return
            except OSError:
                if time.time() > deadline or self.procs[0].poll() is not None:
                    raise RuntimeError(
                        f"the Ray head's job server did not start; see {self.root}/head.log"
                    ) from None
                time.sleep(0.5)

    def _wait_for_nodes(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while True:
            out = subprocess.run(
                [RAY, "status", f"--address={self.address}"],
                env=self.env,
                capture_output=True,
                text=True,
            ).stdout
            active = out.split("Pending:")[0].count("node_")
            if active >= n:
                return
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{n} Ray nodes did not come up; see {self.root}/*.log")
            time.sleep(1)

    def client_env(self) -> dict[str, str]:
        """Environment for a client process (``python -m forge submit``) of this cluster."""
        env = {k: v for k, v in self.env.items() if k not in ("RAY_AUTH_MODE",)}
        env["RAY_API_SERVER_ADDRESS"] = self.dashboard
        return env

    def kill(self) -> None:
        """Stop the nodes, newest first, by their own process groups (SIGTERM, then SIGKILL)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        self.procs = []
