"""The function every Ray Train worker runs: Ray's context in, a :class:`WorkerContext` out.

This is the only place a worker touches Ray (rank, device, report). Training itself happens in
:mod:`forge.loop` (plain PyTorch) or :mod:`forge.lightning_runner` (Lightning).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from forge.config.specs import LaunchPlan, RunSpec
from forge.errors import TrainingError
from forge.loop import WorkerContext, freeze_setup_objects
from forge.progress_channel import ProgressChannel
from forge.progress_sender import BatchedSender


class _ForwardWarnings(logging.Handler):
    """Sends forge's warnings on rank 0 to the driver's console (worker stdout is hidden)."""

    def __init__(self, send: Any) -> None:
        super().__init__(logging.WARNING)
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        self.send({"event": "warning", "message": record.getMessage()})


def train_fn(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker`` for every forge run."""
    import ray.train
    import ray.train.torch

    # What the worker imported leaves the collector's view: the full collections that setup
    # sets off before the first step scan the rest only (forge.loop.freeze_setup_objects).
    freeze_setup_objects()

    spec: RunSpec = config["spec"]
    plan: LaunchPlan = config["plan"]
    channel: ProgressChannel | None = config.get("progress")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    # Rank 0's events go in batches from a background thread: each send is a round trip to
    # the cluster's store that would otherwise stall training at every log step.
    sender = BatchedSender(channel.send) if channel is not None and rank == 0 else None

    def send(event: dict[str, Any]) -> None:
        if sender is not None:
            sender(event)

    # The driver gives this group back itself if its run is abandoned (forge.sweep.release).
    send(
        {
            "event": "placement_group",
            "id": ray.get_runtime_context().get_placement_group_id(),
            "lock_token": plan.lock_token,
        }
    )

    def driver_alive() -> bool:
        # The driver's heartbeat on the progress channel, which every node can read: a worker
        # of a dead driver finds out before its next commit (forge.checkpoint.lock.fence).
        return True if channel is None else channel.driver_alive()

    acks = config.get("report_acks")

    def wait_for_report(step: int) -> None:
        # A sweep trial's validation is a Tune report, and Tune's contract is that a report
        # returns once Tune lets the trial go on (a pause or stop ends these workers instead).
        # Without this, the run trains ahead of Tune's decisions, and synchronous PBT, which
        # expects every trial at each boundary in turn, waits forever. Only rank 0 waits:
        # the other ranks wait for it at the next collective.
        if rank != 0:
            return
        from ray.util.queue import Empty

        send({"event": "report", "step": step})  # after this step's val and checkpoint events

        while True:
            try:
                if acks.get(timeout=30) >= step:
                    return
            except Empty:
                if not driver_alive():
                    raise TrainingError(  # noqa: B904
                        "The sweep trial that started this run is gone; stopping its workers."
                    )

    ctx = WorkerContext(
        rank=rank,
        local_rank=context.get_local_rank(),
        world_size=world_size,
        device=ray.train.torch.get_device(),
        **collectives(rank, world_size),
        on_progress=send,
        driver_alive=driver_alive,
        wait_for_report=wait_for_report if acks is not None else None,
    )
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    else:
        # One intra-op thread per reserved CPU: torch's default (all cores) in every worker
        # oversubscribes the machine and makes CPU steps 10x slower under contention.
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    forge_log = logging.getLogger("forge")
    forge_log.addHandler(_ForwardWarnings(send))
    _record_placement(spec, plan, ctx)
    if spec.recipe.kind == "lightning":
        from forge.lightning_runner import run_lightning

        summary = run_lightning(spec, plan, ctx)
    else:
        from forge.loop import run_loop

        summary = run_loop(spec, plan, ctx)
    # The summary travels on the progress channel: Ray Train V2 keeps metrics only with
    # checkpoints it uploads itself, and forge's checkpoints never go through Ray.
    send({"event": "summary", **summary})
    if sender is not None:
        sender.close()  # every event so far is in the store before fit() can return


def collectives(rank: int, world_size: int) -> dict[str, Any]:
    """The :class:`WorkerContext` collectives over the default process group (or their
    one-process stand-ins): ``all_reduce_sum``, ``all_reduce_sum_async`` and ``gather``.

    Example:
        >>> ops = collectives(rank=0, world_size=1)
        >>> ops["gather"]({"rank": 0})
        [{'rank': 0}]
    """
    distributed = world_size > 1 and dist.is_initialized()

    def all_reduce_sum(tensor: torch.Tensor) -> None:
        if distributed:
            dist.all_reduce(tensor)

    def all_reduce_sum_async(tensor: torch.Tensor) -> Any:
        if not distributed:
            return lambda: None
        return dist.all_reduce(tensor, async_op=True).wait

    def gather(obj: Any) -> list[Any] | None:
        if not distributed:
            return [obj]
        out: list[Any] | None = [None] * world_size if rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    return {
        "all_reduce_sum": all_reduce_sum,
        "all_reduce_sum_async": all_reduce_sum_async,
        "gather": gather,
    }


def _record_placement(spec: RunSpec, plan: LaunchPlan, ctx: WorkerContext) -> None:
    """Rank 0 writes which node each rank runs on into run.json (a collective: all ranks)."""
    import socket

    import ray

    from forge.checkpoint.storage import StorageOptions
    from forge.run_folder import record_placement

    here = {
        "rank": ctx.rank,
        "local_rank": ctx.local_rank,
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "host": socket.gethostname(),
        "device": str(ctx.device),
    }
    ranks = ctx.gather(here)
    if ctx.rank == 0 and ranks is not None:
        try:
            record_placement(plan.run_uri, ranks, StorageOptions.from_spec(spec.storage))
        except Exception as exc:  # provenance must never stop training
            logging.getLogger("forge").warning("could not record placement in run.json: %s", exc)
