"""S3 transfers: concurrent multipart uploads and parallel ranged downloads.

Only :mod:`forge.checkpoint.storage` calls this, for ``s3://`` URIs, and it builds the boto3
client. Every request goes through the caller's :class:`~forge.checkpoint.retry.RetryPolicy`, one
part at a time, so a throttled part is retried alone instead of restarting a 2 GB upload.

A multipart upload that fails is aborted before the error propagates; if the abort itself cannot
reach the server (an outage), :func:`abort_uploads` removes it the next time the run starts.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from forge.checkpoint.retry import (
    Cancelled,
    CancelSignal,
    EitherEvent,
    RetryPolicy,
    TransientStorageError,
)

if TYPE_CHECKING:
    from forge.checkpoint.storage import Buffer

log = logging.getLogger(__name__)
T = TypeVar("T")

# An abort is best effort: a short budget, so a dead server does not hold up the error.
_ABORT_POLICY = RetryPolicy(max_attempts=4, max_wait_s=5.0, initial_backoff_s=0.2)


class _ViewBody(io.RawIOBase):
    """A request body over a memoryview, for botocore (which takes no memoryview).

    ``read`` returns memoryview slices of the caller's buffer, not ``bytes``: every consumer of a
    request body here (SigV4's payload hash, urllib3/http.client's ``sendall``, ssl) takes any
    bytes-like object, and tests an empty chunk with ``not chunk`` or ``== b""``, which a view
    passes. A body is read twice over plain HTTP (hash, then send) and once over HTTPS; copying
    every chunk out as ``bytes`` held the GIL for each copy, so the training thread and the other
    upload threads waited for it (issue 16). Sending views raised forge's upload rate to an
    endpoint that is not the bottleneck from 725-738 to 749-845 MB/s (300 MB, two runs each, to
    the sink endpoint of ``scripts/bench/checkpoint_stream.py``'s measurement 3b; boto3's
    ``upload_file`` read 566-634 MB/s in the same runs). The buffer must stay unchanged until
    the request is done, which the uploader guarantees (it owns the snapshot).
    """

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> memoryview:  # type: ignore[override]
        end = len(self._view) if size is None or size < 0 else self._pos + size
        chunk = self._view[self._pos : end]  # a view: no copy
        self._pos += len(chunk)
        return chunk

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(chunk)] = chunk
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _body_args(data: Buffer) -> dict[str, Any]:
    """The body of a PutObject or UploadPart request for ``data``, with its CRC32.

    The CRC32 (base64, as S3 takes it) is computed here, over the memory itself (zlib releases
    the GIL for it), so that botocore does not read the body once more to compute it. Call once
    per attempt: a retried request must not resume a consumed stream.
    """
    view = memoryview(data).cast("B")
    crc = base64.b64encode(zlib.crc32(view).to_bytes(4, "big")).decode()
    body = data if isinstance(data, bytes) else _ViewBody(view)
    return {"Body": body, "ChecksumAlgorithm": "CRC32", "ChecksumCRC32": crc}


def translate(exc: BaseException, uri: str) -> BaseException:
    """botocore's ClientError as the Python error a file API would raise (404 -> FileNotFound)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return exc
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in {"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "404", "NotFound"} or status == 404:
        return FileNotFoundError(f"{uri} does not exist ({code or status})")
    if code in {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId"} or status == 403:
        return PermissionError(f"{uri}: access denied ({code or status})")
    if code == "PreconditionFailed" or status == 412:
        return FileExistsError(f"{uri} already exists")
    return exc


def call(
    policy: RetryPolicy,
    fn: Callable[[], T],
    what: str,
    uri: str,
    cancel: Any = None,
) -> T:
    """One S3 request under ``policy``; client errors become Python file errors."""

    def attempt() -> T:
        try:
            return fn()
        except Exception as exc:
            translated = translate(exc, uri)
            if translated is exc:
                raise
            raise translated from exc

    return policy.call(attempt, f"{what} {uri}", cancel=cancel)


def put(
    client: Any,
    pool: ThreadPoolExecutor,
    bucket: str,
    key: str,
    data: Buffer,
    *,
    part_size: int,
    policy: RetryPolicy,
    cancel: CancelSignal | None = None,
    if_none_match: bool = False,
) -> None:
    """Upload ``data``; above ``part_size`` as a multipart upload with concurrent parts.

    Every request carries the CRC32 of its bytes, which S3 checks on arrival; a multipart
    object records its parts' CRC32s.
    """
    uri = f"s3://{bucket}/{key}"
    condition = {"IfNoneMatch": "*"} if if_none_match else {}
    view = memoryview(data).cast("B")
    if len(view) <= part_size:
        call(
            policy,
            lambda: client.put_object(Bucket=bucket, Key=key, **_body_args(data), **condition),
            "upload",
            uri,
            cancel,
        )
        return
    upload_id = call(
        policy,
        # CRC32 per part, recorded in the completed object (as boto3's own transfers do).
        lambda: client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")[
            "UploadId"
        ],
        "start multipart upload",
        uri,
        cancel,
    )
    failed = threading.Event()
    stop = EitherEvent(failed, cancel)  # a failed part stops its siblings, not the caller

    def one_part(number: int, offset: int) -> dict[str, Any]:
        if stop.is_set():
            raise Cancelled(uri)
        piece = view[offset : offset + part_size]
        out = call(
            policy,
            lambda: client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                **_body_args(piece),
            ),
            f"upload part {number} of",
            uri,
            stop,
        )
        part = {"PartNumber": number, "ETag": out["ETag"]}
        if out.get("ChecksumCRC32"):
            part["ChecksumCRC32"] = out["ChecksumCRC32"]
        return part

    futures: list[Future[dict[str, Any]]] = []
    try:
        for number, offset in enumerate(range(0, len(view), part_size), start=1):
            futures.append(pool.submit(one_part, number, offset))
        parts = [f.result() for f in futures]
        call(
            policy,
            lambda: client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **condition,
            ),
            "complete multipart upload",
            uri,
            cancel,
        )
    except BaseException:
        failed.set()
        for f in futures:  # no part may land after the abort
            try:
                f.result()
            except BaseException:
                pass
        _abort(client, bucket, key, upload_id)
        raise


def _abort(client: Any, bucket: str, key: str, upload_id: str) -> None:
    uri = f"s3://{bucket}/{key}"
    try:
        call(
            _ABORT_POLICY,
            lambda: client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id),
            "abort multipart upload",
            uri,
        )
    except FileNotFoundError:
        pass  # already gone
    except Exception as exc:
        log.warning(
            "Could not abort the multipart upload of %s (%s); it is removed when this run "
            "folder is next opened for writing.",
            uri,
            exc,
        )


def get(
    client: Any,
    pool: ThreadPoolExecutor,
    bucket: str,
    key: str,
    *,
    part_size: int,
    policy: RetryPolicy,
) -> bytes:
    """Download an object; large ones as concurrent ranged GETs of ``part_size`` each."""
    uri = f"s3://{bucket}/{key}"
    head = call(policy, lambda: client.head_object(Bucket=bucket, Key=key), "stat", uri)
    size, etag = int(head["ContentLength"]), head.get("ETag")
    if size <= 2 * part_size:

        def whole() -> bytes:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            return _read_exactly(body, size, uri)

        return call(policy, whole, "download", uri)
    buf = bytearray(size)
    view = memoryview(buf)
    match = {"IfMatch": etag} if etag else {}  # every range of the same version of the object

    def one_range(start: int) -> None:
        end = min(start + part_size, size) - 1

        def attempt() -> None:
            body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end}", **match)
            view[start : end + 1] = _read_exactly(body["Body"], end - start + 1, uri)

        call(policy, attempt, f"download bytes {start}-{end} of", uri)

    for f in [pool.submit(one_range, start) for start in range(0, size, part_size)]:
        f.result()
    return bytes(buf)


def _read_exactly(body: Any, size: int, uri: str) -> bytes:
    data = body.read()
    if len(data) != size:  # a connection cut mid-body: retry the request
        raise TransientStorageError(f"{uri}: got {len(data)} of {size} bytes")
    return data


def abort_uploads(client: Any, bucket: str, prefix: str, policy: RetryPolicy) -> int:
    """Abort every unfinished multipart upload under ``prefix``; returns how many."""
    uri = f"s3://{bucket}/{prefix}"
    aborted = 0
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        page = call(
            policy, lambda: client.list_multipart_uploads(**kwargs), "list uploads under", uri
        )
        for upload in page.get("Uploads", []):
            _abort(client, bucket, upload["Key"], upload["UploadId"])
            aborted += 1
        if not page.get("IsTruncated"):
            return aborted
        kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
        kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")
