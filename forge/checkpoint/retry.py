"""The one place storage errors are retried: a typed *transient* classification plus backoff.

Every storage request forge makes (fsspec or boto3) runs through :meth:`RetryPolicy.call`.
Clients below it are told not to retry on their own (botocore ``total_max_attempts=1``, s3fs
``retries=1``), so a request is tried exactly as often as the policy says, and a 503 is never
retried three layers deep.

Transient means "the same request may well succeed if sent again": HTTP 5xx, throttling
(``SlowDown``, 429), connection resets and refusals, timeouts. Everything else (a missing key,
access denied, a failed precondition) is raised at once.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import tenacity

from forge.errors import CheckpointError

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "BadGateway",
    "GatewayTimeout",
    "500",
    "502",
    "503",
    "504",
}
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
}
# Class names, so that botocore, urllib3 and aiohttp need not be imported to classify.
_TRANSIENT_CLASSES = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "ProtocolError",
    "ClientConnectionError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ClientOSError",
    "FSTimeoutError",
    "IncompleteRead",
    "RemoteDisconnected",
}


class TransientStorageError(Exception):
    """A storage request failed in a way that retrying may fix (5xx, throttling, a reset)."""


class StorageUnavailableError(CheckpointError):
    """Storage kept failing transiently for longer than the retry budget allows."""


class Cancelled(Exception):
    """The caller gave up on a storage operation (e.g. training failed); nothing was committed."""


class CancelSignal(Protocol):
    """What a storage operation polls to give up: a ``threading.Event``, an :class:`EitherEvent`."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float) -> bool: ...


class EitherEvent:
    """Set when either of two signals is: ``own`` (this operation's, set here) or ``outer`` (the
    caller's), so that a failure cancels its siblings without cancelling the caller's other
    work.

    Example:
        >>> own, outer = threading.Event(), threading.Event()
        >>> either = EitherEvent(own, outer)
        >>> either.is_set(), outer.set(), either.is_set(), own.is_set()
        (False, None, True, False)
    """

    def __init__(self, own: threading.Event, outer: CancelSignal | None) -> None:
        self.own, self.outer = own, outer

    def is_set(self) -> bool:
        return self.own.is_set() or (self.outer is not None and self.outer.is_set())

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.own.wait(min(left, 0.1))  # the outer signal is polled every 0.1 s
        return True


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it wraps) is worth retrying.

    Example:
        >>> is_transient(ConnectionResetError())
        True
        >>> is_transient(FileNotFoundError("s3://b/k"))
        False
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, TransientStorageError):
            return True
        if isinstance(
            cur,
            (
                StorageUnavailableError,
                FileNotFoundError,
                PermissionError,
                FileExistsError,
                Cancelled,
            ),
        ):
            return False
        response = getattr(cur, "response", None)  # botocore ClientError
        if isinstance(response, dict) and "Error" in response:
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS:
                return True
        if any(c.__name__ in _TRANSIENT_CLASSES for c in type(cur).__mro__):
            return True
        if isinstance(cur, (ConnectionError, TimeoutError)):
            return True
        if isinstance(cur, OSError) and cur.errno in _TRANSIENT_ERRNOS:
            return True
        if cur.__cause__ is not None:
            cur = cur.__cause__
        else:
            cur = None if cur.__suppress_context__ else cur.__context__
    return False


def describe(exc: BaseException) -> str:
    """A one-line description of a storage error, the innermost useful cause included."""
    text = f"{type(exc).__name__}: {exc}".strip()
    cause = exc.__cause__  # not __context__: that may be an unrelated error being handled
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying one storage request, with exponential backoff and full jitter.

    Attributes:
        max_attempts: Tries per request (None: limited by time only).
        max_wait_s: Seconds one request may spend, retries and backoff included.
        initial_backoff_s: First backoff ceiling; it doubles per attempt (jittered below it).
        max_backoff_s: Longest single backoff.
        budget_key: The config key that set ``max_wait_s``, named when the budget runs out.

    Example:
        >>> calls = []
        >>> def flaky():
        ...     calls.append(1)
        ...     if len(calls) < 3:
        ...         raise ConnectionResetError("reset by peer")
        ...     return "ok"
        >>> RetryPolicy(initial_backoff_s=0.001).call(flaky, "put s3://b/k")
        'ok'
        >>> len(calls)
        3
    """

    max_attempts: int | None = 8
    max_wait_s: float = 120.0
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 20.0
    budget_key: str = "storage.retry.max_wait_s"

    def call(
        self,
        fn: Callable[[], T],
        what: str,
        *,
        cancel: CancelSignal | None = None,
        on_retry: Callable[[BaseException, int], None] | None = None,
    ) -> T:
        """Run ``fn`` until it succeeds, fails for good, or the budget is spent.

        Args:
            fn: The request. It is called again from scratch on each attempt.
            what: What it does, for messages (``"upload s3://bucket/key"``).
            cancel: Set it to stop retrying (raises :class:`Cancelled`).
            on_retry: Called with the error and the attempt number before each backoff.

        Raises:
            StorageUnavailableError: Transient failures outlasted the budget.
            Cancelled: ``cancel`` was set.
            Exception: A non-transient error, as raised by ``fn``.
        """
        started = time.monotonic()
        stop = tenacity.stop_before_delay(self.max_wait_s)  # no backoff past the budget
        if self.max_attempts is not None:
            stop = stop | tenacity.stop_after_attempt(self.max_attempts)

        def sleep(seconds: float) -> None:
            if cancel is None:
                time.sleep(seconds)
            elif cancel.wait(seconds):
                raise Cancelled(what)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if exc is not None:
                log.info(
                    "storage: %s failed (%s); retry %d", what, describe(exc), state.attempt_number
                )
                if on_retry is not None:
                    on_retry(exc, state.attempt_number)

        def attempt() -> T:
            if cancel is not None and cancel.is_set():
                raise Cancelled(what)
            return fn()

        retryer = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=stop,
            wait=tenacity.wait_random_exponential(
                multiplier=self.initial_backoff_s, max=self.max_backoff_s
            ),
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retryer(attempt)
        except Exception as exc:
            if not is_transient(exc):
                raise
            attempts = retryer.statistics.get("attempt_number", 1)
            limits = f"{self.budget_key}={self.max_wait_s:g}"
            if self.max_attempts is not None:
                limits = f"storage.retry.max_attempts={self.max_attempts}, {limits}"
            raise StorageUnavailableError(
                f"{what}: storage kept failing for {time.monotonic() - started:.0f} s over "
                f"{attempts} attempt(s), beyond the retry budget ({limits}). "
                f"Last error: {describe(exc)}"
            ) from exc
