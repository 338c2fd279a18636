"""Submission overhead: ``forge submit --follow`` vs ``python -m forge ray.address=...``.

Both run the same small digits run on the same local 2-node Ray cluster, which this script
starts (and stops) itself; each is a fresh process, as a user would type it. For each, the
clock runs from starting the command to the first training step printed on its console
(``trainer.log_every_n_steps=1``). The script prints both medians, their ratio, and the size
of the working dir that ``forge submit`` uploaded (files and zipped).

The cluster is real: ``ray start --head`` with Ray's job server (the dashboard) plus a second
raylet, token auth on (``tests/jobs_cluster.py``), so the measured overhead is forge's
validation, packaging and upload, the job supervisor's start, and the runtime env being set up
for the workers.

    python scripts/bench/submit_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))  # jobs_cluster, moto_server: the tests' helpers

STEP_LINE = re.compile(r"^step \d+")


def time_to_first_step(cmd: list[str], env: dict[str, str], timeout_s: float = 600) -> float:
    """Seconds from starting ``cmd`` to its first ``step N`` line; it then runs to the end."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first = None
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if first is None and STEP_LINE.match(line.strip()):
            first = time.perf_counter() - start
        if time.perf_counter() - start > timeout_s:
            proc.kill()
            break
    code = proc.wait()
    if first is None or code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{''.join(lines[-40:])}")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    from jobs_cluster import RayJobsCluster

    from forge.jobs import plan_submission

    cluster = RayJobsCluster()
    root = tempfile.mkdtemp(prefix="forge-bench-submit-")
    common = [
        f"storage.uri={root}",
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=1",
        "trainer.val_every_n_steps=0",
        "checkpoint.every_n_steps=0",
        "scaling.num_workers=2",
        "scaling.placement_strategy=SPREAD",
        "storage.shared=true",  # both "nodes" share this machine's disk
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        "RAY_API_SERVER_ADDRESS": cluster.url,
        "RAY_AUTH_MODE": "token",  # the direct driver joins the token-auth cluster too
        "RAY_AUTH_TOKEN": cluster.token,
    }
    env.pop("RAY_ADDRESS", None)
    py = sys.executable
    submit_s, direct_s = [], []
    try:
        for i in range(args.repeats):
            direct_s.append(
                time_to_first_step(
                    [py, "-m", "forge", *common, f"run_name=direct-{i}",
                     f"ray.address={cluster.address}"],
                    env,
                )
            )  # fmt: skip
            submit_s.append(
                time_to_first_step(
                    [py, "-m", "forge", "submit", "--follow", *common, f"run_name=submit-{i}"],
                    env,
                )
            )
            print(f"round {i}: direct {direct_s[-1]:.1f} s, submit {submit_s[-1]:.1f} s")
        plan = plan_submission(common, working_dir=REPO_ROOT)
    finally:
        cluster.close()
    direct, submit = statistics.median(direct_s), statistics.median(submit_s)
    print(f"time to first step, python -m forge ray.address=...: {direct:.1f} s (median)")
    print(f"time to first step, forge submit --follow:          {submit:.1f} s (median)")
    print(f"ratio submit / direct: {submit / direct:.2f}")
    print(
        f"working dir upload: {plan.upload_bytes / 2**20:.2f} MiB in files (Ray zips it and "
        "keeps the package by content hash, so an unchanged project is sent once)"
    )


if __name__ == "__main__":
    main()
