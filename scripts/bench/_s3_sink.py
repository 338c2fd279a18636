"""An S3 endpoint that reads request bodies and keeps nothing, for ``checkpoint_stream.py``.

Why it exists: on a 2-core machine, any real S3-compatible server (moto, rclone's) competes with
the client for the same cores and sets the pace of every upload, whatever the client does
(issue 16). A remote S3 endpoint scales out instead, and then the client's own work per byte and
its concurrency decide the throughput. This sink stands in for that endpoint: it answers
PutObject, CreateMultipartUpload, UploadPart and CompleteMultipartUpload as S3 does (the same
status codes, headers and XML that botocore parses), reads every body byte into a 1 MiB buffer
per request (``readinto``, nothing kept, no hashing) and counts them. It runs plain HTTP on
loopback, like the moto server, so both clients sign every payload (SigV4's SHA-256). It is a
benchmark device, never a storage backend: nothing can be read back. The tests use moto.

Run as a script it serves on ``127.0.0.1:PORT`` until killed; :class:`SinkProcess` starts it in
a child process (a :class:`ServerProcess`, as the tests' moto server is) so that its work
stays off the client's GIL. ``GET /_sink/bytes`` returns the body
bytes received so far (the benchmark checks that every byte arrived).
"""

from __future__ import annotations

import http.server
import socketserver
import sys
import threading
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from moto_server import ServerProcess  # the tests' local-server helper

_received = 0
_received_lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue as botocore asks for it

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _read_body(self) -> None:
        global _received
        left = int(self.headers.get("Content-Length") or 0)
        total = left
        view = memoryview(bytearray(1 << 20))
        while left:
            got = self.rfile.readinto(view[: min(left, len(view))])
            if not got:
                raise ConnectionError("the client closed the connection mid-body")
            left -= got
        with _received_lock:
            _received += total

    def _reply(self, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path != "/_sink/bytes":
            self.send_error(404)
            return
        self._reply(str(_received).encode())

    def do_PUT(self) -> None:  # PutObject and UploadPart
        self._read_body()
        self._reply(headers={"ETag": f'"{uuid.uuid4().hex}"'})

    def do_POST(self) -> None:  # CreateMultipartUpload (?uploads) and CompleteMultipartUpload
        self._read_body()
        path, _, query = self.path.partition("?")
        bucket, _, key = path.lstrip("/").partition("/")
        if "uploads" in query.split("&"):
            inner = f"<UploadId>{uuid.uuid4().hex}</UploadId>"
            tag = "InitiateMultipartUploadResult"
        else:
            inner = f"<ETag>&quot;{uuid.uuid4().hex}-1&quot;</ETag>"
            tag = "CompleteMultipartUploadResult"
        xml = (
            f'<?xml version="1.0" encoding="UTF-8"?><{tag}><Bucket>{bucket}</Bucket>'
            f"<Key>{key}</Key>{inner}</{tag}>"
        )
        self._reply(xml.encode(), {"Content-Type": "application/xml"})


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 128


class SinkProcess(ServerProcess):
    """The sink in a child process on a free port of 127.0.0.1; ``.endpoint``, ``.received()``,
    ``.cpu_s()``, ``.kill()``.

    Example:
        >>> sink = SinkProcess()  # doctest: +SKIP
        >>> sink.received(), sink.kill()  # doctest: +SKIP
        (0, None)
    """

    name = "the S3 sink"
    probe_path = "/_sink/bytes"

    def command(self, port: int) -> list[str]:
        return [sys.executable, __file__, str(port)]

    def received(self) -> int:
        """Body bytes received so far, over every request."""
        with urllib.request.urlopen(self.endpoint + "/_sink/bytes", timeout=5) as response:
            return int(response.read())


if __name__ == "__main__":
    _Server(("127.0.0.1", int(sys.argv[1])), _Handler).serve_forever()
