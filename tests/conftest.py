"""Shared test fixtures.

One local Ray cluster for the whole session (a head and a second raylet, so placement across
nodes is real), started lazily by the first test that asks for it. Tests join it with
``ray.address=<address>``; forge then neither starts nor stops Ray.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Keep every test's torch to one thread: two cores are shared by workers, raylets and pytest.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """Address of a 2-node local Ray cluster (2 CPUs per node) shared by all tests."""
    import logging

    import ray
    from ray.cluster_utils import Cluster

    logging.getLogger("ray").setLevel(logging.WARNING)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture()
def quiet_console():
    """A rich Console writing into a buffer; ``.file.getvalue()`` is what a user would see."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=10_000, soft_wrap=True)
