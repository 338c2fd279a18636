"""The checkpoint subsystem's thread pools: background threads that yield the CPU to training.

Serializing, hashing and uploading a checkpoint run on threads of the training process, next to
the loop that keeps training (:mod:`forge.checkpoint.streamer`). Where cores are scarce they
competed with it as equals; on Linux every thread of these pools runs at niceness
:data:`BACKGROUND_NICE`, so the scheduler gives the training threads the CPU first (CFS weights:
nice 0 = 1024, nice 10 = 110) and a checkpoint uses what training leaves idle. Raising one's own
niceness needs no privilege; elsewhere (or if refused) the threads keep the process's priority.

In a Ray worker this does nothing: Ray starts its workers at niceness 15 (``RAY_worker_niceness``),
so the threads stay level with training. Moving them to 19 there was measured (issue 16,
``nice -n 15 python scripts/bench/checkpoint_stream.py --size-mb 150``, three alternating pairs on
2 cores): the step-time dent during uploads was 1.17-1.45 with them at 19 against 1.15-1.30 at 15,
so the change was not kept. Why the dent is larger at niceness 15 than at 0 is not established.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

#: Niceness of the checkpoint threads (0 = the training threads'; 19 = the lowest priority).
BACKGROUND_NICE = 10


def lower_this_thread() -> None:
    """Run the calling thread at niceness :data:`BACKGROUND_NICE` (Linux; a no-op elsewhere).

    Linux's ``setpriority(PRIO_PROCESS, tid)`` sets one thread; other systems would read the
    thread id as a process id, so they are left alone.
    """
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < BACKGROUND_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)
    except OSError:  # refused (a sandbox): keep the process's priority
        pass


def background_pool(max_workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run at :data:`BACKGROUND_NICE`.

    Args:
        max_workers: Threads at most (created as work arrives).
        name: Thread name prefix, as ``ThreadPoolExecutor``'s ``thread_name_prefix``.

    Example:
        >>> def thread_nice():  # run in the pool's thread, not the caller's
        ...     return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        >>> with background_pool(1, "doc") as pool:
        ...     nice = pool.submit(thread_nice)
        >>> nice.result() == max(BACKGROUND_NICE, thread_nice())
        True
    """
    return ThreadPoolExecutor(max_workers, thread_name_prefix=name, initializer=lower_this_thread)
