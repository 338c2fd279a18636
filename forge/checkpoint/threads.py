"""The checkpoint subsystem's thread pools: background threads that yield the CPU to training.

Serializing, hashing and uploading a checkpoint run on threads of the training process, next to
the loop that keeps training (:mod:`forge.checkpoint.streamer`). Where cores are scarce they
competed with it as equals; on Linux every thread of these pools runs :data:`BACKGROUND_NICE`
steps of niceness below the process (at most 19), so the scheduler gives the training threads the
CPU first and a checkpoint uses what training leaves idle. CFS weights (``sched_prio_to_weight``
in the Linux kernel): nice 0 = 1024 against nice 10 = 110 in a plain process; nice 15 = 36
against nice 19 = 15 in a Ray worker, which Ray starts at niceness 15 (``RAY_worker_niceness``).

Relative, not absolute: a fixed niceness of 10 left the threads at a Ray worker's 15, level with
training, in every forge run (issue 16). Streaming a 300 MB checkpoint to local storage from a
process at niceness 15, step time during the upload / without was 1.09-1.35 with the threads at
15 and 1.03-1.12 at 19 (``python scripts/bench/checkpoint_stream.py --storage local --nice 15``,
alternating runs; 1.01-1.08 at niceness 0). Raising one's own niceness needs no privilege;
elsewhere (or if refused) the threads keep the process's priority.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

#: How many steps of niceness the checkpoint threads run below the process's main thread (the
#: training threads inherit its niceness), capped at :data:`LOWEST_NICE`.
BACKGROUND_NICE = 10
#: The lowest priority a thread can have on Linux.
LOWEST_NICE = 19


def background_niceness(process_nice: int) -> int:
    """The niceness checkpoint threads get in a process running at ``process_nice``.

    Example:
        >>> background_niceness(0), background_niceness(15), background_niceness(19)
        (10, 19, 19)
    """
    return min(LOWEST_NICE, process_nice + BACKGROUND_NICE)


def lower_this_thread() -> None:
    """Run the calling thread :data:`BACKGROUND_NICE` steps below the process's niceness
    (Linux; a no-op elsewhere).

    Linux's ``setpriority(PRIO_PROCESS, tid)`` sets one thread; other systems would read the
    thread id as a process id, so they are left alone.
    """
    if not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        # The main thread's niceness (its id is the pid), not this thread's: a pool thread
        # started by another background thread inherits that thread's niceness.
        target = background_niceness(os.getpriority(os.PRIO_PROCESS, os.getpid()))
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError:  # refused (a sandbox): keep the process's priority
        pass


def background_pool(max_workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run :data:`BACKGROUND_NICE` steps below the process.

    Args:
        max_workers: Threads at most (created as work arrives).
        name: Thread name prefix, as ``ThreadPoolExecutor``'s ``thread_name_prefix``.

    Example:
        >>> def thread_nice():  # run in the pool's thread, not the caller's
        ...     return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        >>> with background_pool(1, "doc") as pool:
        ...     nice = pool.submit(thread_nice)
        >>> nice.result() == background_niceness(os.getpriority(os.PRIO_PROCESS, os.getpid()))
        True
    """
    return ThreadPoolExecutor(max_workers, thread_name_prefix=name, initializer=lower_this_thread)
