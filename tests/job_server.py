"""A stand-in for Ray's job server, for machines where the real one cannot start.

Ray's job server lives in the dashboard, which needs ``ray[default]`` (aiohttp_cors,
opencensus, prometheus_client, ...); without them ``ray start --include-dashboard=true``
fails with "Cannot include dashboard with missing packages". This server speaks the same
HTTP API (``/api/version``, ``/api/packages``, ``/api/jobs``) to the real
``JobSubmissionClient``, and runs each job the way Ray's job supervisor does: the uploaded
working dir unpacked as the driver's cwd, the job's runtime env handed to the driver through
``RAY_JOB_CONFIG_JSON_ENV_VAR`` (so the driver's ``ray.init`` ships it to every worker of the
real cluster), ``RAY_ADDRESS`` set to the cluster, SIGTERM then SIGKILL on stop, the driver's
exit code recorded. Token auth: requests without ``Authorization: Bearer <token>`` get 401.

Plain module (no pytest), like ``moto_server.py``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moto_server import free_port

STOP_WAIT_S = 20.0  # Ray's RAY_JOB_STOP_WAIT_TIME_S, raised so forge can release its lock


class _Job:
    def __init__(self, request: dict, root: str) -> None:
        self.id = request["submission_id"]
        self.entrypoint = request["entrypoint"]
        self.runtime_env = request.get("runtime_env") or {}
        self.metadata = request.get("metadata") or {}
        self.status = "PENDING"
        self.message = "Job has not started yet."
        self.exit_code: int | None = None
        self.start = int(time.time() * 1000)
        self.end: int | None = None
        self.log_path = os.path.join(root, f"{self.id}.log")
        self.proc: subprocess.Popen | None = None
        self.stopping = False

    def details(self) -> dict:
        return {
            "type": "SUBMISSION",
            "job_id": None,
            "submission_id": self.id,
            "status": self.status,
            "entrypoint": self.entrypoint,
            "message": self.message,
            "start_time": self.start,
            "end_time": self.end,
            "metadata": self.metadata,
            "runtime_env": self.runtime_env,
            "driver_exit_code": self.exit_code,
        }

    def logs(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class FakeJobServer:
    """HTTP job server on 127.0.0.1 that runs jobs against the Ray cluster at ``ray_address``.

    Attributes:
        url: ``http://127.0.0.1:<port>``, for ``--address``.
        token: Required as ``Authorization: Bearer <token>``.
        packages_uploaded: Names and sizes of the packages clients uploaded.
    """

    def __init__(self, ray_address: str, token: str, env: dict[str, str] | None = None) -> None:
        self.ray_address = ray_address
        self.token = token
        self.env = dict(env or os.environ)
        # `python` in an entrypoint is the cluster's Python: here, the one running the tests
        # (on a real cluster, the virtualenv that cluster.yaml's setup commands activate).
        self.env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), self.env["PATH"]])
        self.root = tempfile.mkdtemp(prefix="forge-jobsrv-")
        self.packages: dict[str, str] = {}  # package name -> unpacked folder
        self.packages_uploaded: dict[str, int] = {}
        self.jobs: dict[str, _Job] = {}
        self.lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True).start()

    # -- jobs ---------------------------------------------------------------------------------

    def _local(self, uri: str) -> str:
        name = uri.split("://", 1)[1]
        if name not in self.packages:
            raise KeyError(f"package {uri} was not uploaded")
        return self.packages[name]

    def submit(self, request: dict) -> tuple[int, dict]:
        with self.lock:
            sid = request.get("submission_id") or f"raysubmit_{len(self.jobs)}"
            request["submission_id"] = sid
            if sid in self.jobs:
                return 400, {"error": f"Job with submission_id {sid} already exists. ..."}
            job = _Job(request, self.root)
            self.jobs[sid] = job
        env_in = job.runtime_env
        cwd = self._local(env_in["working_dir"]) if "working_dir" in env_in else self.root
        runtime_env: dict = {}
        if "working_dir" in env_in:
            runtime_env["working_dir"] = cwd
        modules = [self._local(u) for u in env_in.get("py_modules", [])]
        if modules:
            runtime_env["py_modules"] = modules
        env = {
            **self.env,
            "RAY_ADDRESS": self.ray_address,
            "PYTHONUNBUFFERED": "1",
            "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(
                {"runtime_env": runtime_env, "metadata": job.metadata}
            ),
        }
        # The driver runs inside the job's runtime env: py_modules importable, as Ray does.
        parents = [os.path.dirname(m) for m in modules]
        env["PYTHONPATH"] = os.pathsep.join([*parents, cwd, self.env.get("PYTHONPATH", "")])
        log = open(job.log_path, "wb")
        job.proc = subprocess.Popen(
            job.entrypoint,
            shell=True,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        job.status, job.message = "RUNNING", "Job is currently running."
        threading.Thread(target=self._watch, args=(job, log), daemon=True).start()
        return 200, {"job_id": sid, "submission_id": sid}

    def _watch(self, job: _Job, log) -> None:
        code = job.proc.wait()
        log.close()
        job.end = int(time.time() * 1000)
        job.exit_code = code
        if job.stopping:
            job.status, job.message = "STOPPED", "Job was intentionally stopped."
        elif code == 0:
            job.status, job.message = "SUCCEEDED", "Job finished successfully."
        else:
            tail = job.logs()[-2000:]
            job.status = "FAILED"
            job.message = (
                f"Job entrypoint command failed with exit code {code}, last available logs "
                f"(truncated to 20,000 chars):\n{tail}"
            )

    def stop(self, sid: str) -> bool:
        job = self.jobs[sid]
        if job.proc is None or job.proc.poll() is not None:
            return False
        job.stopping = True
        os.killpg(job.proc.pid, signal.SIGTERM)

        def kill_later() -> None:
            try:
                job.proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                os.killpg(job.proc.pid, signal.SIGKILL)

        threading.Thread(target=kill_later, daemon=True).start()
        return True

    def close(self) -> None:
        for job in self.jobs.values():
            if job.proc is not None and job.proc.poll() is None:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait(timeout=10)
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.root, ignore_errors=True)


def _handler(srv: FakeJobServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, body: object) -> None:
            data = json.dumps(body).encode() if not isinstance(body, bytes) else body
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {srv.token}":
                return True
            self._send(401, b"Unauthorized: missing or invalid token")
            return False

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self) -> None:
            if not self._authorized():
                return
            parts = self.path.rstrip("/").split("/")[2:]  # after /api
            if parts == ["version"]:
                import ray

                self._send(
                    200,
                    {"version": "4", "ray_version": ray.__version__, "ray_commit": "fake",
                     "session_name": "fake"},
                )  # fmt: skip
            elif parts[:1] == ["packages"]:
                self._send(200 if parts[2] in srv.packages else 404, {})
            elif parts == ["jobs"]:
                self._send(200, [j.details() for j in srv.jobs.values()])
            elif len(parts) >= 2 and parts[0] == "jobs" and parts[1] in srv.jobs:
                job = srv.jobs[parts[1]]
                if parts[2:] == ["logs"]:
                    self._send(200, {"logs": job.logs()})
                elif parts[2:] == []:
                    self._send(200, job.details())
                else:  # logs/tail is a websocket on the real server: not offered here
                    self._send(404, {})
            else:
                self._send(404, b"Job does not exist")

        def do_PUT(self) -> None:
            if not self._authorized():
                return
            name = self.path.rstrip("/").split("/")[-1]
            data = self._body()
            target = os.path.join(srv.root, "pkg", name.removesuffix(".zip"))
            os.makedirs(target, exist_ok=True)
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                z.extractall(target)
            # py_modules packages unpack to their folder name; working dirs to their contents
            entries = os.listdir(target)
            if len(entries) == 1 and entries[0].startswith("_forge_recipe_"):
                target = os.path.join(target, entries[0])
            srv.packages[name] = target
            srv.packages_uploaded[name] = len(data)
            self._send(200, {})

        def do_POST(self) -> None:
            if not self._authorized():
                return
            parts = self.path.rstrip("/").split("/")[2:]
            if parts == ["jobs"]:
                status, body = srv.submit(json.loads(self._body()))
                self._send(status, body if status == 200 else body["error"].encode())
            elif len(parts) == 3 and parts[2] == "stop" and parts[1] in srv.jobs:
                self._send(200, {"stopped": srv.stop(parts[1])})
            else:
                self._send(404, b"Job does not exist")

    return Handler
