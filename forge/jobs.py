"""Runs on a remote Ray cluster through the Ray Jobs API: the one module that calls it.

``forge.submit(overrides)`` composes and validates the config here, on your machine, so a typo
never reaches the cluster; then it asks the cluster's job server to run::

    python -m forge <overrides> run_name=<name> ray.address=auto

with a runtime env whose working dir is your project (configs, recipes; not run folders,
outputs, virtualenvs, ``.git``, ``.gpu-bundle``, data). The job's submission id comes from the
run name, so submitting the same run again while it runs attaches to it instead of starting a
second one. Following a job streams its logs until it reaches a terminal status and maps the
outcome to the CLI's exit codes: 0 succeeded, 1 failed or stopped, 2 a configuration error that
only the cluster could see (``forge.cli`` exits 2 for those; Ray records the driver's exit code).

Authentication: a cluster with token authentication (``RAY_AUTH_MODE=token``) gets the token
from ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``, as
Ray's own clients do. It travels only in this client's HTTP ``Authorization`` header: never in
the runtime env, the job's metadata, the entrypoint, a saved config or a log.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from forge.errors import ClusterError, ConfigError

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_CONFIG_ERROR = 2  # forge.cli.EXIT_BAD_CONFIG: the job's driver exited with it

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})

# Never uploaded with the working dir: run folders and outputs (they belong in object
# storage), virtualenvs (the cluster has its own Python), git history, the GPU bundle, data
# (read it from storage), caches. Gitignore-style patterns, as Ray's ``excludes`` takes them.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    ".venv",
    "/venv",
    "/env",
    "/runs",
    "/outputs",
    "/multirun",
    "/ray_results",
    "/lightning_logs",
    ".gpu-bundle",
    "/data",  # anchored: forge/data/ is code
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    "node_modules",
)

# Ray refuses packages past its gRPC limit (512 MiB); far earlier, an upload is a mistake (a
# dataset or checkpoint in the project folder) that costs every submission minutes.
DEFAULT_MAX_UPLOAD_MB = 100.0


# ------------------------------------------------------------------------------------------
# Ray-free pieces: address, token, ids, entrypoint, working dir, exit codes.


def resolve_address(address: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The job server's URL: ``address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``.

    A bare ``host:port`` becomes ``http://host:port`` (the job server speaks HTTP on the
    dashboard port, 8265 by default).

    Raises:
        ConfigError: None of them is set.

    Example:
        >>> resolve_address(None, {"RAY_ADDRESS": "head:8265"})
        'http://head:8265'
        >>> resolve_address("https://ray.example.com/", {})
        'https://ray.example.com'
    """
    environ = os.environ if environ is None else environ
    value = (
        address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS") or ""
    ).strip()
    if not value:
        raise ConfigError(
            "No Ray cluster to submit to: pass --address http://<head>:8265 (the job server on "
            "the head node's dashboard port; `ray dashboard cluster.yaml` forwards it to "
            "http://localhost:8265), or set RAY_API_SERVER_ADDRESS (or RAY_ADDRESS)."
        )
    if value != "auto" and "://" not in value:
        value = f"http://{value}"
    return value.rstrip("/")


def load_token(
    environ: Mapping[str, str] | None = None, home: str | Path | None = None
) -> str | None:
    """The cluster's auth token, found where Ray's own clients look; None without one.

    Order (Ray's): ``RAY_AUTH_TOKEN``; the file ``RAY_AUTH_TOKEN_PATH`` (which must then be
    readable); ``~/.ray/auth_token``.

    Raises:
        ConfigError: ``RAY_AUTH_TOKEN_PATH`` names a missing or empty file.

    Example:
        >>> load_token({"RAY_AUTH_TOKEN": " abc "}, home="/nonexistent")
        'abc'
    """
    environ = os.environ if environ is None else environ
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    named = environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        try:
            token = Path(named).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"RAY_AUTH_TOKEN_PATH={named}: cannot read the token file "
                f"({exc.strerror or exc}). Point it at the cluster's token "
                "(`ray get-auth-token` prints it), or unset it."
            ) from None
        if not token:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={named}: the token file is empty.")
        return token
    default = Path(home or Path.home()) / ".ray" / "auth_token"
    try:
        return default.read_text().strip() or None
    except OSError:
        return None


def auth_headers(token: str | None) -> dict[str, str]:
    """HTTP headers that authenticate to a token-auth cluster (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def submission_id(run_name: str, storage_uri: str) -> str:
    """The job's submission id: the run name, plus a short hash of where runs are stored.

    The same run (name and storage root) always maps to the same id, so a second submission
    finds the first job; runs of the same name in different buckets do not collide.

    Example:
        >>> submission_id("exp1", "s3://bucket/runs")
        'forge-exp1-0863ef5c'
    """
    digest = hashlib.sha256(storage_uri.rstrip("/").encode()).hexdigest()[:8]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_name)
    return f"forge-{safe}-{digest}"


def attempt_id(base: str, attempt: int) -> str:
    """The id of the ``attempt``-th submission of a run (0: ``base`` itself).

    A job id is never reused by Ray; a run that stopped or failed and is submitted again
    (``resume=auto``) becomes ``<base>-r1``, ``<base>-r2``, ...
    """
    return base if attempt == 0 else f"{base}-r{attempt}"


def entrypoint(overrides: Sequence[str]) -> str:
    """The shell command the job runs on the cluster (the same CLI as on a laptop).

    Example:
        >>> entrypoint(["trainer.max_steps=5", "run_name=a b"])
        "python -m forge trainer.max_steps=5 'run_name=a b' ray.address=auto"
    """
    return shlex.join(["python", "-m", "forge", *overrides, "ray.address=auto"])


def exit_code(status: str, driver_exit_code: int | None) -> int:
    """The CLI's exit code for a finished job.

    Example:
        >>> exit_code("SUCCEEDED", 0), exit_code("FAILED", 2), exit_code("FAILED", 1)
        (0, 2, 1)
    """
    if status == "SUCCEEDED":
        return EXIT_SUCCEEDED
    if status == "FAILED" and driver_exit_code == EXIT_CONFIG_ERROR:
        return EXIT_CONFIG_ERROR
    return EXIT_FAILED


def _matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Gitignore-style matching, with the same library Ray uses for ``excludes``."""
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", list(patterns))
    return spec.match_file


def upload_files(
    working_dir: str | Path, excludes: Sequence[str] = DEFAULT_EXCLUDES
) -> list[tuple[str, int]]:
    """The files Ray will upload for ``working_dir``, as (relative path, bytes).

    Applies ``excludes`` and, as Ray does, the ``.gitignore`` and ``.rayignore`` files found
    in each folder (relative to that folder).
    """
    root = Path(working_dir).resolve()
    top = _matcher(excludes)
    out: list[tuple[str, int]] = []

    def walk(folder: Path, ignores: list[tuple[Path, Callable[[str], bool]]]) -> None:
        ignores = list(ignores)
        for name in (".gitignore", ".rayignore"):
            if name == ".gitignore" and os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE"):
                continue
            file = folder / name
            if file.is_file():
                ignores.append((folder, _matcher(file.read_text().splitlines())))
        for entry in sorted(folder.iterdir()):
            rel = entry.relative_to(root).as_posix()
            probe = rel + "/" if entry.is_dir() else rel
            if top(probe) or any(
                m(entry.relative_to(base).as_posix() + probe[len(rel) :]) for base, m in ignores
            ):
                continue
            if entry.is_symlink() and not entry.exists():
                continue
            if entry.is_dir():
                walk(entry, ignores)
            elif entry.is_file():
                out.append((rel, entry.stat().st_size))

    walk(root, [])
    return out


def find_virtualenvs(working_dir: str | Path, depth: int = 2) -> list[str]:
    """Anchored exclude patterns for virtualenvs (folders with ``pyvenv.cfg``) of any name."""
    root = Path(working_dir).resolve()
    found: list[str] = []

    def scan(folder: Path, level: int) -> None:
        for entry in sorted(folder.iterdir()):
            if not entry.is_dir() or entry.is_symlink() or entry.name == ".git":
                continue
            if (entry / "pyvenv.cfg").is_file():
                found.append("/" + entry.relative_to(root).as_posix() + "/")
            elif level < depth:
                scan(entry, level + 1)

    scan(root, 1)
    return found


def check_upload_size(files: Sequence[tuple[str, int]], max_mb: float, working_dir: str) -> int:
    """Total bytes of ``files``; past ``max_mb`` a ConfigError that names the largest files.

    Raises:
        ConfigError: The upload is larger than ``max_mb`` MiB.

    Example:
        >>> check_upload_size([("a.py", 10), ("b.py", 20)], 1.0, ".")
        30
    """
    total = sum(size for _, size in files)
    if total <= max_mb * 2**20:
        return total
    largest = sorted(files, key=lambda f: -f[1])[:5]
    names = ", ".join(f"{name} ({size / 2**20:.1f} MiB)" for name, size in largest)
    raise ConfigError(
        f"The working dir {working_dir} would upload {total / 2**20:.1f} MiB to the cluster, "
        f"more than the {max_mb:g} MiB limit. Largest files: {names}. Move data and "
        "checkpoints to object storage (storage.uri=s3://...), list them in a .rayignore file "
        "(gitignore syntax), or raise the limit (--max-upload-mb / max_upload_mb=)."
    )


_SECRET_WORDS = {"secret", "password", "passwd", "token", "credential", "credentials"}


def looks_secret(key: str) -> bool:
    """Whether an override's key names a secret (by whole words: ``max_tokens`` does not).

    Example:
        >>> looks_secret("+storage.aws_secret_access_key"), looks_secret("params.max_tokens")
        (True, False)
    """
    low = key.lower()
    words = set(re.split(r"[^a-z0-9]+", low))
    return bool(words & _SECRET_WORDS) or "access_key" in low or "api_key" in low


@dataclass(frozen=True)
class JobPlan:
    """What will be submitted; built locally, before anything reaches the cluster.

    Attributes:
        submission_id: The first attempt's id (see :func:`submission_id`).
        run_name: The run folder's name under ``storage.uri``.
        overrides: The overrides the job runs with (``run_name`` added, ``ray.address``
            dropped).
        entrypoint: The job's shell command.
        runtime_env: Working dir, excludes and shipped recipe files. No environment variables:
            credentials and the auth token stay out of it.
        metadata: Shown by ``ray job list`` / ``forge jobs list``; holds no secrets.
        upload_bytes: Size of the working dir upload.
    """

    submission_id: str
    run_name: str
    overrides: list[str]
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    upload_bytes: int
    staging: str | None = field(default=None, repr=False)


def plan_submission(
    overrides: Sequence[str],
    *,
    working_dir: str | Path | None = None,
    excludes: Sequence[str] = (),
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    now: float | None = None,
) -> JobPlan:
    """Compose and validate ``overrides`` here, and build the job; no Ray, no network.

    Args:
        overrides: Hydra overrides, as for ``python -m forge``.
        working_dir: The project folder uploaded as the job's working dir (default: the
            current directory).
        excludes: More gitignore-style patterns to leave out, besides :data:`DEFAULT_EXCLUDES`.
        max_upload_mb: Refuse a larger working dir upload.
        now: Time for the default run name (``<recipe>-<UTC stamp>``, as ``forge.train``).

    Raises:
        ConfigError: A bad config, a secret in an override, a too large working dir.
    """
    from forge.config.compose import compose
    from forge.config.validate import to_run_spec
    from forge.recipe import stage_recipe_file

    overrides = [o for o in overrides if not o.lstrip("+~").startswith("ray.address")]
    secret = [o for o in overrides if looks_secret(o.partition("=")[0])]
    if secret:
        raise ConfigError(
            f"{secret[0].partition('=')[0]}: a secret in an override would be stored in the "
            "job's entrypoint, visible to everyone who can list the cluster's jobs. Set it in "
            "the cluster nodes' environment (or their instance role) instead."
        )
    spec = to_run_spec(compose(overrides))  # everything that does not need the cluster
    run_name = spec.run_name
    if run_name is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
        run_name = f"{spec.recipe.name}-{stamp}"
        overrides = [*overrides, f"run_name={run_name}"]
    root = str(Path(working_dir or os.getcwd()).resolve())
    patterns = [*DEFAULT_EXCLUDES, *find_virtualenvs(root), *excludes]
    upload = check_upload_size(upload_files(root, patterns), max_mb=max_upload_mb, working_dir=root)
    runtime_env: dict[str, Any] = {"working_dir": root, "excludes": patterns}
    staging = None
    if spec.recipe.module.endswith(".py"):
        # The job's driver and its workers find the file through this package wherever its
        # path does not exist (forge.recipe.import_recipe_module), on every node.
        recipe_path = Path(spec.recipe.module).expanduser().resolve()
        staging = tempfile.mkdtemp(prefix="forge-submit-")
        runtime_env["py_modules"] = [stage_recipe_file(recipe_path, staging)]
        # Absolute, and explicit even when it came from a config file: every process derives
        # the package's name from this exact path.
        overrides = [o for o in overrides if not o.lstrip("+").startswith("recipe.module=")]
        overrides.append(f"recipe.module={recipe_path}")
    job_id = submission_id(run_name, spec.storage.uri)
    return JobPlan(
        submission_id=job_id,
        run_name=run_name,
        overrides=list(overrides),
        entrypoint=entrypoint(overrides),
        runtime_env=runtime_env,
        metadata={"forge_run_name": run_name, "forge_recipe": spec.recipe.name},
        upload_bytes=upload,
        staging=staging,
    )


# ------------------------------------------------------------------------------------------
# The Jobs API.


def make_client(address: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for the resolved address, with the token as a header."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url, headers=auth_headers(load_token()))
    except _auth_error() as exc:  # 401/403 from a token-auth cluster: no or a wrong token
        raise ConfigError(
            f"The Ray job server at {url} refused this client ({_first_line(exc)}): the "
            "cluster uses token authentication. Put its token (`ray get-auth-token` on the "
            "head prints it) in RAY_AUTH_TOKEN or ~/.ray/auth_token."
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"Cannot reach the Ray job server at {url} ({_first_line(exc)}). Check the address "
            "(the head node's dashboard port, 8265 by default; `ray dashboard cluster.yaml` "
            "forwards it), and for a token-auth cluster set RAY_AUTH_TOKEN or "
            "~/.ray/auth_token."
        ) from None


def _auth_error() -> type[BaseException]:
    """Ray's error for a 401/403 from the job server (a RayError, not a RuntimeError)."""
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # a Ray before token authentication (2.52)
        return RuntimeError
    return AuthenticationError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class JobHandle:
    """A job on the cluster: ``.id``, ``.status()``, ``.logs()``, ``.stop()``, ``.wait()``.

    Attributes:
        id: The submission id.
        attached: True when :func:`submit` found this job already running and attached.
    """

    def __init__(self, client: Any, job_id: str, attached: bool = False) -> None:
        self._client = client
        self.id = job_id
        self.attached = attached

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    def info(self) -> Any:
        """Ray's ``JobDetails`` (status, message, driver_exit_code, metadata, times)."""
        return self._client.get_job_info(self.id)

    def status(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return str(_status_name(self._client.get_job_status(self.id)))

    def logs(self) -> str:
        """Everything the job's driver printed so far."""
        return self._client.get_job_logs(self.id)

    def stop(self) -> bool:
        """Ask the cluster to stop the job (SIGTERM to the driver, then SIGKILL)."""
        return bool(self._client.stop_job(self.id))

    def exit_code(self) -> int | None:
        """The CLI exit code of a finished job (see :func:`exit_code`); None while it runs."""
        info = self.info()
        status = _status_name(info.status)
        if status not in TERMINAL_STATUSES:
            return None
        return exit_code(status, getattr(info, "driver_exit_code", None))

    def wait(self, timeout_s: float | None = None, poll_s: float = 2.0) -> str:
        """Block until the job reaches a terminal status; returns it.

        Raises:
            TimeoutError: Still running after ``timeout_s`` seconds.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status in TERMINAL_STATUSES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} is still {status} after {timeout_s} s")
            time.sleep(poll_s)

    def follow(self, out: TextIO | None = None, poll_s: float = 2.0) -> int:
        """Print the job's logs as they come until it ends; returns :meth:`exit_code`.

        The end of a log stream is not the end of the job (the connection may drop, the
        server may restart): the stream is reopened until the status is terminal, printing
        only what was not printed yet.
        """
        return follow_logs(self._client, self.id, out or sys.stdout, poll_s=poll_s)


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def follow_logs(client: Any, job_id: str, out: TextIO, poll_s: float = 2.0) -> int:
    """Stream ``job_id``'s logs to ``out`` until the job is terminal; returns the exit code.

    Each (re)opened stream starts at the beginning of the job's log, so only the characters
    past those already printed are written. A stream that cannot be opened three times in a
    row (a proxy that drops websockets) gives way to polling the whole log.
    """
    printed = 0
    failures = 0

    def emit(text: str) -> None:
        nonlocal printed
        if len(text) > printed:
            out.write(text[printed:])
            out.flush()
            printed = len(text)

    while True:
        if failures < 3:
            text = ""
            try:
                for chunk in _iter_tail(client, job_id):
                    text += chunk
                    emit(text)
                failures = 0
            except Exception:  # dropped or refused: read what there is, then reconnect
                failures += 1
                emit(client.get_job_logs(job_id))
        else:
            emit(client.get_job_logs(job_id))
        info = client.get_job_info(job_id)
        status = _status_name(info.status)
        if status in TERMINAL_STATUSES:
            emit(client.get_job_logs(job_id))  # whatever the stream had not delivered yet
            return exit_code(status, getattr(info, "driver_exit_code", None))
        time.sleep(poll_s)


def _iter_tail(client: Any, job_id: str) -> Iterator[str]:
    """``client.tail_job_logs`` (an async generator) as a plain iterator."""
    import asyncio

    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        try:
            loop.run_until_complete(stream.aclose())
        except Exception:
            pass
        loop.close()


def _call(what: str, fn: Callable[[], Any]) -> Any:
    """A Jobs API call; Ray's errors (refused, unauthorized, unknown id) become one paragraph."""

    try:
        return fn()
    except (_auth_error(), RuntimeError, ConnectionError, OSError, ValueError) as exc:
        raise ClusterError(f"{what}: {_first_line(exc)}") from None


def submit(
    overrides: Sequence[str],
    address: str | None = None,
    follow: bool = False,
    *,
    working_dir: str | Path | None = None,
    excludes: Sequence[str] = (),
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    out: TextIO | None = None,
) -> JobHandle:
    """Validate ``overrides`` here, then run them as a job on the Ray cluster at ``address``.

    Args:
        overrides: Hydra overrides, as for ``python -m forge``; ``run_name`` names the job.
        address: The job server (``http://head:8265``); default ``RAY_API_SERVER_ADDRESS``
            or ``RAY_ADDRESS``.
        follow: Print the job's logs until it ends before returning.
        working_dir: The project folder to upload (default: the current directory).
        excludes: More gitignore-style patterns to leave out of the upload.
        max_upload_mb: Refuse a larger upload (default 100 MiB).
        out: Where followed logs go (default stdout).

    Returns:
        A :class:`JobHandle`; ``handle.attached`` says it was already running.

    Raises:
        ConfigError: A bad config or upload, refused before anything reaches the cluster; no
            address.
        ClusterError: The job server refused or could not be reached; the run name is
            running with other overrides.

    Example:
        >>> job = forge.submit(["experiment=digits", "run_name=exp1"])  # doctest: +SKIP
        >>> job.wait(), job.exit_code()  # doctest: +SKIP
        ('SUCCEEDED', 0)
    """
    import shutil

    plan = plan_submission(
        overrides, working_dir=working_dir, excludes=excludes, max_upload_mb=max_upload_mb
    )
    try:
        client = make_client(address)
        handle = submit_plan(client, plan)
    finally:
        if plan.staging:
            shutil.rmtree(plan.staging, ignore_errors=True)
    if follow:
        handle.follow(out)
    return handle


def submit_plan(client: Any, plan: JobPlan) -> JobHandle:
    """Submit ``plan``, or attach to the attempt of the same run that is still running."""

    jobs = _call("listing the cluster's jobs", client.list_jobs)
    by_id = {j.submission_id: j for j in jobs if getattr(j, "submission_id", None)}
    attempt = 0
    while (job_id := attempt_id(plan.submission_id, attempt)) in by_id:
        job = by_id[job_id]
        if _status_name(job.status) not in TERMINAL_STATUSES:
            if job.entrypoint != plan.entrypoint:
                raise ClusterError(
                    f"run_name={plan.run_name} is already running on the cluster as job "
                    f"{job_id}, with other overrides ({job.entrypoint}). Follow it with "
                    f"`python -m forge jobs logs {job_id} --follow`, stop it with "
                    f"`python -m forge jobs stop {job_id}`, or choose another run_name."
                )
            return JobHandle(client, job_id, attached=True)
        attempt += 1
    try:
        _submit_when_an_agent_is_up(
            lambda: client.submit_job(
                entrypoint=plan.entrypoint,
                submission_id=job_id,
                runtime_env=plan.runtime_env,
                metadata=plan.metadata,
            )
        )
    except RuntimeError as exc:
        if "already exists" in str(exc):  # a concurrent submission of the same run won
            return JobHandle(client, job_id, attached=True)
        raise ClusterError(f"The job server refused the job: {_first_line(exc)}") from None
    except (ConnectionError, OSError, ValueError) as exc:
        raise ClusterError(f"Submitting the job failed: {_first_line(exc)}") from None
    return JobHandle(client, job_id)


# Right after a cluster starts (``ray up``, a fresh head), the job server answers 500 "No
# available agent to submit job" until a node's dashboard agent has registered; Ray's own
# message says to try again later. Wait that out instead of failing the submission.
AGENT_WAIT_S = 60.0


def _submit_when_an_agent_is_up(submit: Callable[[], Any], wait_s: float = AGENT_WAIT_S) -> Any:
    """Call ``submit``, retrying while the job server has no agent yet (up to ``wait_s``).

    Example:
        >>> calls = []
        >>> def flaky():
        ...     calls.append(1)
        ...     if len(calls) < 3:
        ...         raise RuntimeError("No available agent to submit job, please try again later.")
        ...     return "raysubmit_1"
        >>> _submit_when_an_agent_is_up(flaky, wait_s=5), len(calls)
        ('raysubmit_1', 3)
    """
    deadline = time.monotonic() + wait_s
    delay = 0.1
    while True:
        try:
            return submit()
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def get_job(job_id: str, address: str | None = None) -> JobHandle:
    """A handle on an existing job (``forge jobs status ID`` and friends)."""
    client = make_client(address)
    _call(f"job {job_id}", lambda: client.get_job_info(job_id))
    return JobHandle(client, job_id)


def list_jobs(address: str | None = None) -> list[Any]:
    """Every job the cluster knows (Ray's ``JobDetails``), oldest first."""
    client = make_client(address)
    jobs = _call("listing the cluster's jobs", client.list_jobs)
    return sorted(jobs, key=lambda j: getattr(j, "start_time", 0) or 0)
