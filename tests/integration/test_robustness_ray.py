"""Issue 9 faults that are Ray's: which cluster the default joins, and restarts of lost workers.

Everything else of issue 9 is tested without Ray (tests/unit/test_robustness_*.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import forge
from forge.errors import TrainingError

pytestmark = pytest.mark.ray

REPO = str(Path(__file__).resolve().parents[2])


def test_default_starts_its_own_ray_beside_a_running_cluster_and_auto_joins_it(ray_cluster):
    """The bug: with a cluster running (here RAY_ADDRESS names the shared one), the default
    ray.init() joined it and crashed on num_cpus. Now null starts its own; auto joins."""
    script = textwrap.dedent(
        """
        import ray
        from forge.cluster import ray_session
        from forge.config.specs import RaySpec

        def gcs():
            return ray.get_runtime_context().gcs_address

        with ray_session(RaySpec(address=None, num_cpus=1)):
            print("null", gcs(), flush=True)
        with ray_session(RaySpec(address="auto")):
            print("auto", gcs(), flush=True)
        """
    )
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONPATH": REPO}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = dict(line.split() for line in proc.stdout.splitlines() if line[:4] in ("null", "auto"))
    assert seen["auto"] == ray_cluster
    assert seen["null"] != ray_cluster


@pytest.mark.slow  # ~30 s: two worker groups started and killed
def test_gives_up_after_max_failures(ray_cluster, tmp_path, quiet_console):
    """A worker process that dies every time (SIGKILL, as the OOM killer would) is restarted
    trainer.max_failures times, then the run ends with one clear paragraph."""
    recipe = tmp_path / "dies.py"
    recipe.write_text(
        "import os, signal\n"
        "from recipes.digits import Params, train_size\n"
        "def train_data(params):  # the driver profiles this, and never calls build()\n"
        "    return None\n"
        "def build(params):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    with pytest.raises(TrainingError) as info:
        forge.train(
            [
                f"ray.address={ray_cluster}",
                f"storage.uri={tmp_path}",
                f"recipe.module={recipe}",
                "scaling.num_workers=1",
                "trainer.max_failures=1",
            ],
            console=quiet_console,
        )
    message = str(info.value)
    assert "gave up after 1 restart(s) (trainer.max_failures=1)" in message
    assert "Traceback" not in message
    assert "restart 1 of 1" in quiet_console.file.getvalue()
