"""A real S3-compatible server (moto's) in a child process, for the tests and the benchmarks.

Plain module (no pytest): ``tests/conftest.py`` builds its fixtures on it, and
``scripts/bench/checkpoint_stream.py`` and its sink endpoint (``scripts/bench/_s3_sink.py``, a
:class:`ServerProcess` too) import it with ``tests/`` on ``sys.path``.
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


class ServerProcess:
    """A local HTTP server in a child process on a free port of 127.0.0.1: started by
    :meth:`command`, ready once ``endpoint + probe_path`` answers (within 30 s)."""

    #: What the server is called in the error raised when it does not start.
    name = "server"
    #: A GET path that answers once the server is up.
    probe_path = "/"

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            self.command(self.port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + self.probe_path, timeout=1).close()
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError(f"{self.name} did not start") from None
                time.sleep(0.1)

    def command(self, port: int) -> list[str]:
        """The child process's command line, serving on ``port``."""
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL: no goodbye to open connections, and all its state is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far (user + system)."""
        import psutil  # a Ray dependency

        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system


class MotoProcess(ServerProcess):
    """``python -m moto.server`` on 127.0.0.1 in its own process (kill it to kill the server)."""

    name = "moto server"
    probe_path = "/moto-api/"

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
