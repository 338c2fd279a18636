"""One local Ray for the GPU tests: every CPU and GPU of this machine, started once.

The CPU suite's ``ray_cluster`` declares 2 CPUs per node and no GPUs, which a GPU worker
(``scaling=gpu``: 4 CPUs and 1 GPU each) could never be placed on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def gpu_ray() -> Iterator[str]:
    """``ray.address=<this>`` joins a local Ray holding all of the machine's CPUs and GPUs."""
    import ray
    import torch

    ray.init(
        num_cpus=os.cpu_count(),
        num_gpus=torch.cuda.device_count(),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
