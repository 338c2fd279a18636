"""``python -m forge submit ...`` and ``python -m forge jobs ...``: thin verbs over forge.jobs.

::

    python -m forge submit [--address URL] [--follow] [--working-dir DIR] [--exclude PATTERN]
                           [--max-upload-mb N] overrides...
    python -m forge jobs list | status ID | logs ID [--follow] | stop ID   [--address URL]

Exit codes: 0 submitted (or, with ``--follow``, succeeded); 1 the job failed or was stopped;
2 a configuration error, found here or on the cluster.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from forge import jobs


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def submit_main(args: Sequence[str]) -> int:
    """``python -m forge submit``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m forge submit",
        description="Validate a run here, then run it as a job on a Ray cluster.",
    )
    parser.add_argument("--address", help="job server URL (default: $RAY_API_SERVER_ADDRESS)")
    parser.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    parser.add_argument("--working-dir", default=None, help="project folder to upload (.)")
    parser.add_argument(
        "--exclude", action="append", default=[], help="gitignore-style pattern to leave out"
    )
    parser.add_argument("--max-upload-mb", type=float, default=jobs.DEFAULT_MAX_UPLOAD_MB)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m forge")
    ns = parser.parse_intermixed_args(list(args))
    handle = jobs.submit(
        ns.overrides,
        address=ns.address,
        working_dir=ns.working_dir,
        excludes=ns.exclude,
        max_upload_mb=ns.max_upload_mb,
    )
    if handle.attached:
        _err(f"forge: run already running as job {handle.id}; attached to it")
    else:
        _err(f"forge: submitted job {handle.id}")
    if not ns.follow:
        _err(
            f"  follow: python -m forge jobs logs {handle.id} --follow\n"
            f"  stop:   python -m forge jobs stop {handle.id}"
        )
        return 0
    return _follow(handle)


def _follow(handle: jobs.JobHandle) -> int:
    code = handle.follow(sys.stdout)
    info = handle.info()
    status = jobs._status_name(info.status)
    line = f"forge: job {handle.id} {status}"
    if code == jobs.EXIT_CONFIG_ERROR:
        line += " (configuration error; see the message above)"
    elif code and info.message:
        line += f": {info.message.splitlines()[0]}"
    _err(line)
    return code


def jobs_main(args: Sequence[str]) -> int:
    """``python -m forge jobs list|status|logs|stop``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m forge jobs", description="List, follow and stop jobs on a Ray cluster."
    )
    parser.add_argument("--address", help="job server URL (default: $RAY_API_SERVER_ADDRESS)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every job on the cluster")
    for name, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        p.add_argument("--address", dest="sub_address", default=None)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="until the job ends")
        if name == "stop":
            p.add_argument("--no-wait", action="store_true", help="do not wait until it stopped")
    ns = parser.parse_args(list(args))
    address = getattr(ns, "sub_address", None) or ns.address
    if ns.command == "list":
        rows = jobs.list_jobs(address)
        print(f"{'ID':<44} {'STATUS':<10} {'STARTED (UTC)':<20} RUN")
        for job in rows:
            started = job.start_time and time.strftime(
                "%Y-%m-%d %H:%M:%S", time.gmtime(job.start_time / 1000)
            )
            run = (job.metadata or {}).get("forge_run_name", "")
            job_id = job.submission_id or job.job_id or "?"
            print(f"{job_id:<44} {jobs._status_name(job.status):<10} {started or '':<20} {run}")
        return 0
    handle = jobs.get_job(ns.id, address)
    if ns.command == "status":
        info = handle.info()
        print(jobs._status_name(info.status))
        if info.message:
            print(info.message)
        return 0
    if ns.command == "logs":
        if ns.follow:
            return _follow(handle)
        sys.stdout.write(handle.logs())
        return 0
    handle.stop()
    if ns.no_wait:
        _err(f"forge: asked job {handle.id} to stop")
        return 0
    _err(f"forge: job {handle.id} {handle.wait()}; committed checkpoints are kept (resume=auto)")
    return 0
