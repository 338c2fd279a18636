"""Shared test fixtures.

One local Ray cluster for the whole session (a head and a second raylet, so placement across
nodes is real), started lazily by the first test that asks for it. Tests join it with
``ray.address=<address>``; forge then neither starts nor stops Ray.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from moto_server import MotoProcess, free_port

# Keep every test's torch to one thread: two cores are shared by workers, raylets and pytest.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """Address of a 2-node local Ray cluster (2 CPUs per node) shared by all tests."""
    import logging

    import ray
    from ray.cluster_utils import Cluster

    logging.getLogger("ray").setLevel(logging.WARNING)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="session")
def jobs_cluster() -> Iterator:
    """A real 2-node Ray cluster with Ray's job server (the dashboard), token auth on.

    ``ray start --head`` (2 CPUs, dashboard on 127.0.0.1) plus a second raylet (2 CPUs), in a
    temp dir and on ports of their own, so it never collides with ``ray_cluster`` or another
    engineer's Ray. Torn down by the PIDs of its own processes (found by that temp dir), never
    ``ray stop``, which would stop every Ray of this user. The pytest process never joins it
    (a driver holds one Ray at a time): tests talk to it only over the job HTTP API (``.url``,
    ``.token``).
    """
    from jobs_cluster import RayJobsCluster

    cluster = RayJobsCluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for the test: with two test processes on two cores, more
    would oversubscribe them (and make timings and DeepSpeed's CPU ops crawl)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def quiet_console():
    """A rich Console writing into a buffer; ``.file.getvalue()`` is what a user would see."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=10_000, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# A real S3-compatible server (moto's, over HTTP on 127.0.0.1), and faults in front of it.

# Fake credentials for the whole session, set before any Ray cluster starts so its workers
# inherit them: these tests talk only to local servers, never to AWS.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "forge-test",
        "AWS_SECRET_ACCESS_KEY": "forge-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server shared by the session (use a fresh bucket per test)."""
    server = MotoProcess()
    try:
        yield server.endpoint
    finally:
        server.kill()


def make_bucket(endpoint: str) -> str:
    """A new, uniquely named bucket on ``endpoint``; returns ``s3://<name>``."""
    import uuid

    import boto3

    name = f"forge-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """``s3://<fresh bucket>`` on the session's S3 server."""
    return make_bucket(s3_server)


@pytest.fixture()
def s3_client(s3_server: str):
    """A plain boto3 client of the session's S3 server, for checking what landed there."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server)


class FaultyS3Proxy:
    """An HTTP proxy in front of an S3 server that fails requests on purpose.

    * ``fail_every = n``: every n-th request gets ``503 SlowDown`` (or ``fail_status`` with
      ``fail_code``) instead of reaching the server.
    * ``kill()`` / ``revive()``: the endpoint dies (open connections reset, new ones refused)
      and comes back on the same port; the server behind it keeps its state, as S3 does.
    * ``kill_at_part(n, revive_after_s=None)``: kill when the n-th multipart part arrives.
    * ``on_part``: called with the part count as each ``UploadPart`` arrives; it may return
      ``(status, code)`` to answer with that error instead, or raise to drop the connection.
    """

    def __init__(self, upstream: str) -> None:
        import threading

        host, port = upstream.split("://", 1)[1].split(":")
        self.upstream = (host, int(port))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.fail_every = 0
        self.fail_status = 503
        self.fail_code = "SlowDown"
        self.requests = 0
        self.injected = 0
        self.parts = 0
        self.on_part = None
        self._lock = threading.Lock()
        self._conns: set = set()
        self._server = None
        self._dead = threading.Event()  # set at once by kill(): no request gets through after
        self._switch = threading.RLock()  # kill() and revive() one at a time
        self.revive()

    # -- control --------------------------------------------------------------------------------

    def revive(self) -> None:
        import threading
        import time
        from http.server import ThreadingHTTPServer

        proxy = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address) -> None:
                pass  # resets and drops are the point

        with self._switch:
            if self._server is not None:
                return
            deadline = time.time() + 10
            while True:
                try:
                    server = Server(("127.0.0.1", self.port), _make_handler(proxy))
                    break
                except OSError:  # the killed listener's port is not free yet
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)
            self._server = server
            self._dead.clear()
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def kill(self) -> None:
        import socket
        import struct

        self._dead.set()
        with self._switch:
            server = self._server
            if server is None:
                return
            server.shutdown()
            server.server_close()
            self._server = None
            with self._lock:
                conns, self._conns = list(self._conns), set()
        for conn in conns:  # cut every open connection, as a crashed server's kernel would
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)  # close() alone waits for the handler's files
                conn.close()
            except OSError:
                pass

    def kill_at_part(self, n: int, revive_after_s: float | None = None) -> None:
        import threading

        def on_part(count: int) -> None:
            if count == n:
                self.kill()  # here, in the handler: nothing gets through after this part
                if revive_after_s is not None:
                    threading.Timer(revive_after_s, self.revive).start()
                raise ConnectionAbortedError("killed")

        self.on_part = on_part

    @property
    def alive(self) -> bool:
        return self._server is not None and not self._dead.is_set()


def _make_handler(proxy: FaultyS3Proxy):
    import http.client
    from http.server import BaseHTTPRequestHandler

    hop = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with proxy._lock:
                proxy._conns.add(self.connection)

        def finish(self) -> None:
            with proxy._lock:
                proxy._conns.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, headers: list, body: bytes, head: bool) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _proxy(self) -> None:
            if proxy._dead.is_set():
                raise ConnectionAbortedError("the endpoint is dead")
            body = self._body()
            head = self.command == "HEAD"
            with proxy._lock:
                proxy.requests += 1
                number = proxy.requests
                is_part = self.command == "PUT" and "partNumber=" in self.path
                if is_part:
                    proxy.parts += 1
                parts = proxy.parts
            error = None
            if proxy.fail_every and number % proxy.fail_every == 0:
                error = (proxy.fail_status, proxy.fail_code)
            elif is_part and proxy.on_part is not None:
                error = proxy.on_part(parts)  # may raise: the connection drops, no answer
            if proxy._dead.is_set():
                raise ConnectionAbortedError("the endpoint is dead")
            if error is not None:
                with proxy._lock:
                    proxy.injected += 1
                xml = (
                    '<?xml version="1.0" encoding="UTF-8"?><Error>'
                    f"<Code>{error[1]}</Code><Message>injected by the test proxy</Message>"
                    "<RequestId>forge-test</RequestId></Error>"
                ).encode()
                self._reply(
                    error[0],
                    [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))],
                    xml,
                    head,
                )
                return
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in hop]
                if not head:
                    out = [(k, v) for k, v in out if k.lower() != "content-length"]
                    out.append(("Content-Length", str(len(data))))
                self._reply(resp.status, out, data, head)
            finally:
                upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

    return Handler


@pytest.fixture()
def s3_proxy(s3_server: str) -> Iterator[FaultyS3Proxy]:
    """A :class:`FaultyS3Proxy` in front of the session's S3 server (healthy until told)."""
    proxy = FaultyS3Proxy(s3_server)
    try:
        yield proxy
    finally:
        proxy.kill()


@pytest.fixture()
def killable_s3() -> Iterator[MotoProcess]:
    """A moto server of this test's own, in a process the test may SIGKILL."""
    server = MotoProcess()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture()
def make_s3_proxy():
    """Builds a :class:`FaultyS3Proxy` in front of any endpoint; all are stopped at the end."""
    proxies: list[FaultyS3Proxy] = []

    def make(upstream: str) -> FaultyS3Proxy:
        proxies.append(FaultyS3Proxy(upstream))
        return proxies[-1]

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.kill()
