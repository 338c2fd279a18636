"""One run per run folder: an exclusive lock object, ``<run>/_forge.lock``.

The driver creates it with a conditional write (S3 ``If-None-Match: *``, ``O_EXCL`` locally)
before any worker starts, refreshes a heartbeat in it while the run goes on, and deletes it at
the end. A second run on the same folder is refused with a message naming the holder. A lock
left by a run that died (no heartbeat for ``stale_after_s``) is taken over by ``resume=auto``,
one whose process is gone from this very host by any run, and ``storage.break_lock=true``
takes over any lock but one whose process is alive on this host (pid and process start time
checked): that run is not dead, whatever its heartbeat says.

A lock can still be lost (a run on another host took it over after a long stall). So the lock
also *fences* commits: :func:`commit_fence` gives rank 0 a check that runs right before each
manifest is written, and refuses the commit (:class:`LockLostError`) when the lock no longer
holds this run's token, or when the driver that holds it is gone (its pid, on this host; a
Ray-side liveness check, or a stale heartbeat, elsewhere). Workers of a killed driver thus stop
before they commit anything a new run could mix with its own.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
import uuid
from typing import Any

from forge.checkpoint import storage
from forge.checkpoint.storage import StorageOptions
from forge.config.specs import LOCK_HEARTBEAT_S
from forge.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "_forge.lock"


class LockLostError(CheckpointError):
    """This run no longer holds its run folder's lock (or its driver is gone): nothing more
    may be committed."""


class RunLock:
    """A held lock on a run folder; use :meth:`acquire`, then :meth:`release` (or ``with``).

    Example:
        >>> lock = RunLock.acquire("memory://doc-lock/run", heartbeat_s=None)
        >>> RunLock.acquire("memory://doc-lock/run")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        forge.errors.ConfigError: memory://doc-lock/run is in use by another forge run ...
        >>> lock.release()
        >>> RunLock.acquire("memory://doc-lock/run", heartbeat_s=None).release()
    """

    def __init__(self, run_uri: str, info: dict[str, Any], options: StorageOptions | None) -> None:
        self.run_uri = run_uri
        self.uri = storage.join(run_uri, LOCK_NAME)
        self.info = info
        self.options = options
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(
        cls,
        run_uri: str,
        *,
        options: StorageOptions | None = None,
        stale_after_s: float = 300.0,
        take_over_stale: bool = False,
        break_lock: bool = False,
        heartbeat_s: float | None = LOCK_HEARTBEAT_S,
        description: str = "",
    ) -> RunLock:
        """Take the lock of ``run_uri`` or raise ConfigError naming the run that holds it.

        Args:
            run_uri: The run folder.
            options: How to reach the storage.
            stale_after_s: A lock whose heartbeat is older than this counts as abandoned.
            take_over_stale: Take over an abandoned lock (``resume=auto`` does).
            break_lock: Take over any lock (``storage.break_lock=true``).
            heartbeat_s: Refresh period of the heartbeat (None: no heartbeat thread).
            description: What holds it, for the other run's message (e.g. the command).
        """
        run_uri = storage.normalize(run_uri)
        now = time.time()
        info = {
            "token": uuid.uuid4().hex,
            "host": platform.node(),
            "pid": os.getpid(),
            "pid_started": _process_start(os.getpid()),
            "started_at": now,
            "heartbeat_at": now,
            "description": description,
        }
        lock = cls(run_uri, info, options)
        for _ in range(3):  # the holder may release between our two requests: try again
            if storage.create_exclusive(lock.uri, lock._payload(), options):
                break
            held = lock._read()
            if held is None:
                continue
            if held.get("token") == info["token"]:
                break  # our own write, answered 412 on a retry after a lost response
            age = time.time() - float(held.get("heartbeat_at", 0))
            if _holder_is_alive_here(held):
                raise ConfigError(
                    f"{run_uri} is in use by another forge run that is alive on this host "
                    f"({_holder(held)}, last heartbeat {age:.0f} s ago): it is never taken over, "
                    "whatever storage.break_lock or storage.lock_stale_after_s say. Wait for it "
                    f"to finish, stop it (kill {held.get('pid')}), or use another run_name."
                )
            if break_lock or (take_over_stale and age > stale_after_s) or _holder_is_dead(held):
                log.warning(
                    "Taking over the lock of %s from %s (last heartbeat %.0f s ago; %s).",
                    run_uri,
                    _holder(held),
                    age,
                    "storage.break_lock=true"
                    if break_lock
                    else ("that process is gone" if _holder_is_dead(held) else "stale"),
                )
                storage.remove(lock.uri, options)
                continue
            raise ConfigError(
                f"{run_uri} is in use by another forge run ({_holder(held)}, last heartbeat "
                f"{age:.0f} s ago): two runs writing one run folder would mix their checkpoints. "
                "Wait for it to finish, or start this one with another run_name. If that run is "
                f"gone (it died without deleting {lock.uri}), rerun with storage.break_lock=true,"
                f" or with resume=auto once the lock is older than storage.lock_stale_after_s="
                f"{stale_after_s:g} s."
            )
        else:
            raise ConfigError(f"Could not take the lock {lock.uri}: another run keeps taking it.")
        if heartbeat_s:
            lock._thread = threading.Thread(
                target=lock._beat, args=(heartbeat_s,), name="forge-lock", daemon=True
            )
            lock._thread.start()
        return lock

    def release(self) -> None:
        """Stop the heartbeat and delete the lock, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            held = self._read()
            if held is not None and held.get("token") == self.info["token"]:
                storage.remove(self.uri, self.options)
        except Exception as exc:  # the run's result matters more than the lock
            log.warning(
                "Could not release %s (%s); the next run may need break_lock.", self.uri, exc
            )

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _payload(self) -> bytes:
        return json.dumps(self.info, indent=1).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.uri, self.options))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"description": "an unreadable lock file", "heartbeat_at": 0}

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                held = self._read()
                if held is None or held.get("token") != self.info["token"]:
                    log.warning(
                        "The lock %s was taken over by %s; this run no longer holds it.",
                        self.uri,
                        _holder(held) if held else "nobody",
                    )
                    return
                self.info["heartbeat_at"] = time.time()
                storage.write_bytes(self.uri, self._payload(), self.options)
            except Exception as exc:
                log.info("lock heartbeat of %s failed: %s", self.uri, exc)


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # Field 22; the command name (field 2) may hold spaces, so count from its ')'.
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _pid_state(info: dict[str, Any]) -> str:
    """'alive', 'dead' or 'unknown' (another host, or no pid) for the holder in ``info``."""
    pid = info.get("pid")
    if info.get("host") != platform.node() or not isinstance(pid, int):
        return "unknown"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except OSError:  # exists, owned by another user
        pass
    started = info.get("pid_started")
    if started is not None and _process_start(pid) not in (None, started):
        return "dead"  # the pid now names another process
    return "alive"


def _holder_is_dead(info: dict[str, Any]) -> bool:
    """True when the lock was taken on this host by a process that no longer exists."""
    return _pid_state(info) == "dead"


def _holder_is_alive_here(info: dict[str, Any]) -> bool:
    """True when the lock's holder is a live process on this host."""
    return _pid_state(info) == "alive"


def commit_fence(
    run_uri: str,
    token: str,
    *,
    options: StorageOptions | None = None,
    stale_after_s: float = 300.0,
    driver_alive: Any = None,
) -> Any:
    """A check to run right before each commit: raises :class:`LockLostError` when the run
    folder's lock no longer belongs to the run with ``token``, or its driver is gone.

    Args:
        run_uri: The run folder.
        token: The driver's lock token (:attr:`forge.config.specs.LaunchPlan.lock_token`).
        options: How to reach the storage.
        stale_after_s: Elsewhere than the driver's host, a heartbeat older than this means the
            driver is gone.
        driver_alive: Optional ``() -> bool``, a liveness signal of the driver that works
            across hosts (the worker passes a ping of a Ray actor the driver owns).

    Example:
        >>> lock = RunLock.acquire("memory://doc-fence/run", heartbeat_s=None)
        >>> fence = commit_fence("memory://doc-fence/run", lock.info["token"])
        >>> fence()  # ours: commit
        >>> lock.release()
        >>> fence()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        forge.checkpoint.lock.LockLostError: This run no longer holds the lock ...
    """
    uri = storage.join(storage.normalize(run_uri), LOCK_NAME)

    def check() -> None:
        try:
            held: dict[str, Any] | None = json.loads(storage.read_bytes(uri, options))
        except FileNotFoundError:
            held = None
        except ValueError:
            held = {}
        if held is None or held.get("token") != token:
            raise LockLostError(
                f"This run no longer holds the lock {uri} "
                f"({'taken over by ' + _holder(held) if held else 'it was deleted'}), so it "
                "stopped before committing more checkpoints into a folder another run may be "
                "writing. Its committed checkpoints are intact; resume with resume=auto once "
                "the other run is done, or use another run_name."
            )
        state = _pid_state(held)
        age = time.time() - float(held.get("heartbeat_at", 0))
        gone = state == "dead" or (state == "unknown" and age > stale_after_s)
        if not gone and driver_alive is not None and not driver_alive():
            gone = True
        if gone:
            raise LockLostError(
                f"The driver of this run ({_holder(held)}) is gone, so its workers stopped "
                "before committing another checkpoint. Committed checkpoints are intact; "
                "resume with resume=auto."
            )

    return check


def _holder(info: dict[str, Any]) -> str:
    started = info.get("started_at")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "?"
    what = f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {when}"
    if info.get("description"):
        what += f", {info['description']}"
    return what
