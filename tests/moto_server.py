"""A real S3-compatible server (moto's) in a child process, for the tests and the benchmarks.

Plain module (no pytest): ``tests/conftest.py`` builds its fixtures on it and
``scripts/bench/checkpoint_stream.py`` imports it with ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoProcess:
    """``python -m moto.server`` on 127.0.0.1 in its own process (kill it to kill the server)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no goodbye to open connections, and all its state is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
