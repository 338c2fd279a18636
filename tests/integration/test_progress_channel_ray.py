"""forge.progress_channel on the shared Ray cluster's own key-value store: a task on either node
sends what the driver receives, and sees the driver's heartbeat move."""

from __future__ import annotations

import pytest

from forge.progress_channel import ProgressChannel

pytestmark = pytest.mark.ray


def test_tasks_on_every_node_reach_the_driver_through_the_store(ray_cluster) -> None:
    import ray

    driver = ProgressChannel()
    driver.beat()

    @ray.remote(num_cpus=1, scheduling_strategy="SPREAD")  # the other node's store client too
    def rank0(channel: ProgressChannel, first: int) -> tuple[bool, str]:
        assert channel.driver_alive()  # the heartbeat is readable here, and new to this copy
        channel._next_send = first  # one writer per channel in forge; two here, numbered apart
        node = ray.get_runtime_context().get_node_id()
        channel.send([{"event": "log", "step": first, "node": node}])
        return True, node

    results = ray.get([rank0.remote(driver, n) for n in (0, 1)])
    assert all(ok for ok, _ in results)
    events = driver.receive()
    assert [e["step"] for e in events] == [0, 1]
    assert {e["node"] for e in events} == {node for _, node in results}
    driver.close()

    # Nothing left in the store: a second reader sees neither batches nor a heartbeat.
    late = ProgressChannel(driver.id)
    assert late.receive() == []
    assert late._kv.get(late._key("alive")) is None
