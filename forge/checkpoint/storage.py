"""Storage paths are ``str`` URIs handled by fsspec; local paths become absolute paths.

This is the only module that turns a URI into a filesystem or an S3 client, so remote-storage
concerns have one home: endpoint and region (:class:`StorageOptions`), credentials (left to the
standard AWS chain: environment, shared files, instance roles; never part of a config), and
retries (every request goes through ``options.retry``, see :mod:`forge.checkpoint.retry`).

``s3://`` objects are written and read by :mod:`forge.checkpoint.s3` (concurrent multipart
uploads, parallel ranged downloads); listing and deleting go through s3fs. Other schemes
(``memory://`` in tests, ``gs://``, ...) use fsspec as they are.

Local paths never go through fsspec's URL parsing: to fsspec ``a::b`` chains two URLs, ``*``,
``?``, ``[`` and ``{`` are globs, and ``#``/``?`` may start a fragment or query, so a folder
named ``odd::dir`` or ``run[1]`` would silently be written elsewhere or deleted by a pattern.
They are handled with ``os`` and ``shutil`` instead. Remote URIs are checked up front
(:func:`check_uri`: scheme, bucket, key) and refused when they hold such characters.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from forge.checkpoint.retry import CancelSignal, RetryPolicy, StorageUnavailableError, describe
from forge.checkpoint.threads import background_pool
from forge.errors import ConfigError

MiB = 2**20
# A file's bytes as writers take them. The serializers return memoryviews (one-dimensional, of
# unsigned bytes) over memory they filled without holding the GIL (forge.checkpoint.serialize).
Buffer = bytes | bytearray | memoryview
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 60


@dataclass(frozen=True)
class StorageOptions:
    """How to reach storage; built from the ``storage`` config group by :meth:`from_spec`.

    Attributes:
        endpoint_url: An S3-compatible endpoint (MinIO, a local test server); None for AWS, or
            for ``$AWS_ENDPOINT_URL`` which botocore reads itself.
        region: The bucket's region; None lets the AWS chain decide.
        retry: Retries of each request.
        part_size: Multipart part and download range size in bytes (S3's minimum is 5 MiB).
        max_concurrency: Parallel part uploads / range downloads per process.
    """

    endpoint_url: str | None = None
    region: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    part_size: int = 16 * MiB
    max_concurrency: int = 8

    @staticmethod
    def from_spec(spec: Any) -> StorageOptions:
        """From a :class:`forge.config.specs.StorageSpec`."""
        return StorageOptions(
            endpoint_url=spec.endpoint_url,
            region=spec.region,
            retry=RetryPolicy(
                max_attempts=spec.retry.max_attempts, max_wait_s=spec.retry.max_wait_s
            ),
            part_size=spec.part_size_mb * MiB,
            max_concurrency=spec.max_concurrency,
        )


DEFAULT_OPTIONS = StorageOptions()


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Characters fsspec or a URL parser give a meaning to (chaining, globs, query, fragment):
# refused in remote URIs, where forge cannot sidestep the parser.
_URL_SPECIAL = ("::", "*", "?", "[", "]", "{", "}", "#")
# https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def scheme(uri: str) -> str | None:
    """The URI's scheme (``s3``, ``memory``, ``file``), or None for a plain path.

    Only a leading ``name://`` is a scheme: ``/data/a://b`` and ``odd::dir`` are paths.

    Example:
        >>> scheme("s3://b/k"), scheme("/data/odd::dir"), scheme("runs/a://b")
        ('s3', None, None)
    """
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else None


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file://``."""
    return scheme(uri) not in (None, "file")


def check_uri(uri: str) -> str | None:
    """Why ``uri`` cannot be used as storage, or None when it can.

    Local paths may hold any character but NUL (they are never parsed as URLs). Remote URIs
    need a scheme fsspec knows, no characters that fsspec reads as chaining, globs, a query or
    a fragment, and for S3 a valid bucket name.

    Example:
        >>> check_uri("/data/odd::dir/run[1]") is None
        True
        >>> check_uri("s3://Bad_Bucket/runs")  # doctest: +ELLIPSIS
        "s3://Bad_Bucket/runs: 'Bad_Bucket' is not a valid S3 bucket name ..."
    """
    if "\0" in uri:
        return f"{uri!r}: a path cannot contain a NUL character"
    name = scheme(uri)
    if name in (None, "file"):
        return None
    from fsspec.registry import known_implementations, registry

    if name not in known_implementations and name not in registry:
        return (
            f"{uri}: unknown storage scheme '{name}://'. Use a local path, file://, "
            "s3://bucket/prefix or another fsspec scheme (memory://, gs://, ...)"
        )
    special = [c for c in _URL_SPECIAL if c in uri[len(name) + 3 :]]
    if special:
        return (
            f"{uri}: {' '.join(repr(c) for c in special)} in a remote URI would be read as "
            "URL chaining, a glob, a query or a fragment, and the data would go elsewhere. "
            "Use letters, digits, '-', '_', '.', '=' and '/' in bucket, prefix and run_name"
        )
    if name in ("s3", "s3a"):
        bucket, key = split_s3(uri)
        if not _S3_BUCKET.match(bucket) or ".." in bucket:
            return (
                f"{uri}: '{bucket}' is not a valid S3 bucket name (3-63 characters: lowercase "
                "letters, digits, '.' and '-', starting and ending with a letter or digit). "
                "Write storage.uri=s3://<bucket>/<prefix>"
            )
        if "//" in key:
            return f"{uri}: an empty path segment ('//') in the key; remove it"
    return None


def is_s3(uri: str) -> bool:
    """True for ``s3://`` (and ``s3a://``) URIs."""
    return uri.startswith(("s3://", "s3a://"))


def normalize(uri: str) -> str:
    """Absolute local path for local paths and ``file://`` URIs; other URIs unchanged.

    Example:
        >>> normalize("memory://bucket/run/")
        'memory://bucket/run'
    """
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if scheme(uri) is None:
        return os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/'.

    Example:
        >>> join("s3://bucket/runs", "exp1", "checkpoints")
        's3://bucket/runs/exp1/checkpoints'
    """
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``.

    Example:
        >>> split_s3("s3://bucket/runs/exp1")
        ('bucket', 'runs/exp1')
    """
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


# -- building clients (the only place) ----------------------------------------------------------

_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}


def _client_key(kind: str, options: StorageOptions) -> tuple[Any, ...]:
    # Retry policy is per call, not per client: two policies share one connection pool.
    return (kind, os.getpid(), options.endpoint_url, options.region, options.max_concurrency)


def _botocore_config(options: StorageOptions) -> dict[str, Any]:
    return {
        # forge's RetryPolicy is the only retry loop; botocore must not retry underneath it.
        "retries": {"total_max_attempts": 1},
        "connect_timeout": _CONNECT_TIMEOUT_S,
        "read_timeout": _READ_TIMEOUT_S,
        "max_pool_connections": max(10, 2 * options.max_concurrency),
    }


def _s3fs(options: StorageOptions) -> fsspec.AbstractFileSystem:
    key = _client_key("s3fs", options)
    with _lock:
        fs = _clients.get(key)
        if fs is None:
            import s3fs

            client_kwargs = {}
            if options.endpoint_url:
                client_kwargs["endpoint_url"] = options.endpoint_url
            if options.region:
                client_kwargs["region_name"] = options.region
            fs = s3fs.S3FileSystem(
                client_kwargs=client_kwargs,
                config_kwargs=_botocore_config(options),
                # Other processes write the same prefixes (ranks, the driver): never trust a
                # cached listing.
                use_listings_cache=False,
                skip_instance_cache=True,
            )
            fs.retries = 1  # s3fs's own retry loop off: see _botocore_config
            _clients[key] = fs
        return fs


def _boto3(options: StorageOptions) -> tuple[Any, ThreadPoolExecutor]:
    """A boto3 S3 client (thread-safe) and the pool its concurrent transfers run on."""
    key = _client_key("boto3", options)
    with _lock:
        found = _clients.get(key)
        if found is None:
            import boto3
            from botocore.config import Config

            client = boto3.session.Session().client(
                "s3",
                endpoint_url=options.endpoint_url,
                region_name=options.region,
                config=Config(**_botocore_config(options)),
            )
            pool = background_pool(options.max_concurrency, "forge-s3")
            found = _clients[key] = (client, pool)
        return found


def filesystem(
    uri: str, options: StorageOptions | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it."""
    options = options or DEFAULT_OPTIONS
    if is_s3(uri):
        return _s3fs(options), uri.split("://", 1)[1]
    if not is_remote(uri):  # never parsed as a URL (see the module docstring)
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(), normalize(uri)
    return url_to_fs(uri)


# -- operations -----------------------------------------------------------------------------------


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _local(uri: str) -> str | None:
    """The local path of ``uri``, or None for a remote URI; local paths skip fsspec."""
    return None if is_remote(uri) else normalize(uri)


def _retry(options: StorageOptions | None, fn: Any, what: str, cancel: Any = None) -> Any:
    return (options or DEFAULT_OPTIONS).retry.call(fn, what, cancel=cancel)


def write_bytes(
    uri: str,
    data: Buffer,
    options: StorageOptions | None = None,
    *,
    cancel: CancelSignal | None = None,
) -> None:
    """Write ``data`` to ``uri`` (a concurrent multipart upload for large S3 objects).

    Local files are written to a temporary name and renamed, so a reader never sees half a file.

    Example:
        >>> write_bytes("memory://doc-storage/a/b.txt", b"hi")
        >>> read_bytes("memory://doc-storage/a/b.txt")
        b'hi'
    """
    options = options or DEFAULT_OPTIONS
    if is_s3(uri):
        from forge.checkpoint import s3

        client, pool = _boto3(options)
        bucket, key = split_s3(uri)
        s3.put(
            client,
            pool,
            bucket,
            key,
            data,
            part_size=options.part_size,
            policy=options.retry,
            cancel=cancel,
        )
        return
    path = _local(uri)
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, path = filesystem(uri, options)

    def put() -> None:
        parent = path.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        # fsspec's backends are only sure to take bytes; memoryviews come from the serializers.
        fs.pipe_file(path, data if isinstance(data, bytes) else bytes(data))

    _retry(options, put, f"write {uri}", cancel)


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """The whole object at ``uri`` (parallel ranged downloads for large S3 objects).

    Raises:
        FileNotFoundError: There is nothing at ``uri``.
    """
    options = options or DEFAULT_OPTIONS
    if is_s3(uri):
        from forge.checkpoint import s3

        client, pool = _boto3(options)
        bucket, key = split_s3(uri)
        return s3.get(client, pool, bucket, key, part_size=options.part_size, policy=options.retry)
    path = _local(uri)
    if path is not None:
        with open(path, "rb") as f:
            return f.read()
    fs, path = filesystem(uri, options)
    return _retry(options, lambda: fs.cat_file(path), f"read {uri}")


def local_path(uri: str, options: StorageOptions | None = None) -> str | None:
    """The path of ``uri`` on this machine's file system, or None when it is remote.

    Example:
        >>> local_path("/tmp/run/ckpt"), local_path("s3://bucket/run")
        ('/tmp/run/ckpt', None)
    """
    return _local(uri)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """Whether anything (an object or a folder) is at ``uri``."""
    path = _local(uri)
    if path is not None:
        return os.path.lexists(path)
    fs, path = filesystem(uri, options)
    return _retry(options, lambda: fs.exists(path), f"stat {uri}")


def list_dir(uri: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """Entries directly under ``uri`` (name = last path part, type, size); [] when missing."""
    path = _local(uri)
    if path is not None:
        try:
            with os.scandir(path) as entries:
                return [_local_entry(e) for e in entries]
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, path = filesystem(uri, options)

    def ls() -> list[dict[str, Any]]:
        try:
            return fs.ls(path, detail=True)
        except FileNotFoundError:
            return []

    entries = _retry(options, ls, f"list {uri}")
    return [{**e, "name": e["name"].rstrip("/").rsplit("/", 1)[-1]} for e in entries]


def _local_entry(entry: os.DirEntry[str]) -> dict[str, Any]:
    is_dir = entry.is_dir(follow_symlinks=False)
    size = 0 if is_dir else entry.stat(follow_symlinks=False).st_size
    return {"name": entry.name, "type": "directory" if is_dir else "file", "size": size}


def remove(uri: str, options: StorageOptions | None = None) -> None:
    """Delete ``uri`` and everything under it; nothing happens when it does not exist."""
    path = _local(uri)
    if path is not None:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            pass
        return
    fs, path = filesystem(uri, options)

    def rm() -> None:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    _retry(options, rm, f"delete {uri}")


def create_exclusive(uri: str, data: bytes, options: StorageOptions | None = None) -> bool:
    """Write ``data`` only if nothing is at ``uri`` yet; False if something is.

    Atomic on S3 (a conditional put, ``If-None-Match: *``) and on local disks (``O_EXCL``);
    on other fsspec backends a check followed by a write.

    Example:
        >>> create_exclusive("memory://doc-storage/lock", b"me")
        True
        >>> create_exclusive("memory://doc-storage/lock", b"you")
        False
    """
    options = options or DEFAULT_OPTIONS
    try:
        if is_s3(uri):
            from forge.checkpoint import s3

            client, pool = _boto3(options)
            bucket, key = split_s3(uri)
            s3.put(
                client,
                pool,
                bucket,
                key,
                data,
                part_size=max(options.part_size, len(data)),
                policy=options.retry,
                if_none_match=True,
            )
            return True
        path = _local(uri)
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "xb") as f:
                f.write(data)
            return True
    except FileExistsError:
        return False
    if exists(uri, options):
        return False
    write_bytes(uri, data, options)
    return True


def abort_uploads(uri: str, options: StorageOptions | None = None) -> int:
    """Abort unfinished multipart uploads under ``uri`` (S3 only); returns how many."""
    if not is_s3(uri):
        return 0
    from forge.checkpoint import s3

    options = options or DEFAULT_OPTIONS
    client, _ = _boto3(options)
    bucket, key = split_s3(uri)
    return s3.abort_uploads(client, bucket, key.rstrip("/") + "/", options.retry)


def probe(uri: str, options: StorageOptions | None = None) -> None:
    """Check, on the driver, that ``uri`` can be reached, before any worker starts.

    Raises:
        ConfigError: A local folder that cannot be created or written (read-only file system,
            permissions); an endpoint that does not answer, a bucket that does not exist, or
            credentials missing or refused; the message says which and what to check.
    """
    path = _local(uri)
    if path is not None:
        _probe_local(uri, path)
        return
    if not is_s3(uri):
        return
    options = options or DEFAULT_OPTIONS
    bucket, _ = split_s3(uri)
    endpoint = _display(options.endpoint_url) or "AWS (no storage.endpoint_url)"
    quick = RetryPolicy(max_attempts=3, max_wait_s=min(10.0, options.retry.max_wait_s))
    client, _ = _boto3(options)
    from forge.checkpoint import s3

    try:
        s3.call(quick, lambda: client.head_bucket(Bucket=bucket), "check bucket", f"s3://{bucket}")
    except FileNotFoundError:
        raise ConfigError(
            f"storage.uri={uri}: bucket '{bucket}' does not exist at {endpoint}. Create it "
            f"(aws s3 mb s3://{bucket}) or point storage.uri at an existing bucket."
        ) from None
    except PermissionError:
        raise ConfigError(
            f"storage.uri={uri}: access to bucket '{bucket}' at {endpoint} was denied. Check "
            "the AWS credentials forge runs with (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or the instance role) and the bucket's policy."
        ) from None
    except StorageUnavailableError as exc:
        raise ConfigError(
            f"storage.uri={uri}: cannot reach the storage at {endpoint} "
            f"({describe(exc.__cause__ or exc)}). Check storage.endpoint_url and "
            "storage.region, and that the server is running and reachable from here."
        ) from None
    except Exception as exc:
        if type(exc).__name__ in {"NoCredentialsError", "PartialCredentialsError"}:
            raise ConfigError(
                f"storage.uri={uri}: no AWS credentials found. forge reads them from the "
                "standard AWS chain: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE, or run where an instance role provides them. Never put them in "
                "the config."
            ) from None
        raise ConfigError(
            f"storage.uri={uri}: checking bucket '{bucket}' at {endpoint} failed: {describe(exc)}"
        ) from None


def _probe_local(uri: str, path: str) -> None:
    """Create ``path`` and write a file into it, so an unwritable folder fails here."""
    try:
        os.makedirs(path, exist_ok=True)
        probe_file = os.path.join(path, f".forge-probe-{uuid.uuid4().hex[:8]}")
        with open(probe_file, "wb"):
            pass
        os.remove(probe_file)
    except OSError as exc:
        raise ConfigError(
            f"storage.uri={uri}: cannot write to {path} ({exc.strerror or exc}). Point "
            "storage.uri at a folder you can write to (e.g. storage.uri=runs), or fix its "
            "permissions."
        ) from None


def _display(url: str | None) -> str | None:
    """An endpoint URL without any user:password part, for messages.

    Example:
        >>> _display("http://user:pw@host:9000")
        'http://host:9000'
    """
    if not url or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('@', 1)[1]}"
