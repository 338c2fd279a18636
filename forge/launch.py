"""Specs -> Ray Train: the one module that builds a TorchTrainer and runs it."""

from __future__ import annotations

import os
import tempfile
import threading
import uuid
from collections.abc import Callable
from typing import Any

from forge.config.specs import LaunchPlan, RunSpec
from forge.errors import ForgeError, TrainingError

ProgressFn = Callable[[dict[str, Any]], None]


def launch(spec: RunSpec, plan: LaunchPlan, on_progress: ProgressFn) -> dict[str, Any]:
    """Run ``spec`` on the connected Ray cluster; returns rank 0's final summary.

    Raises:
        ForgeError: re-raised as is when a worker raised one (e.g. a ConfigError).
        TrainingError: any other worker failure, with the root cause in one paragraph.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from forge.worker import train_fn

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    summary: dict[str, Any] = {}

    def handle(event: dict[str, Any]) -> None:
        if event.get("event") == "summary":
            summary.update(event)
        else:
            on_progress(event)

    stop = threading.Event()
    pump = threading.Thread(target=_pump, args=(queue, handle, stop), daemon=True)
    pump.start()

    scaling = spec.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    datasets = data_config = None
    if plan.data_table is not None:  # a file source: Ray Data reads it, Ray Train shards it
        from forge.data.feed import check_spare_cpus, make_datasets

        check_spare_cpus(
            ray.cluster_resources().get("CPU", 0), scaling.num_workers, scaling.cpus_per_worker
        )
        datasets = make_datasets(plan.data_table, spec.seed)
        # Only "train" is split across workers; every worker evaluates all of "val".
        data_config = ray.train.DataConfig(datasets_to_split=["train"])
    trainer = TorchTrainer(
        train_fn,
        datasets=datasets,
        dataset_config=data_config,
        train_loop_config={"spec": spec, "plan": plan, "progress": queue},
        torch_config=TorchConfig(backend=scaling.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            # forge owns checkpoints and the run folder; Ray only keeps its own bookkeeping,
            # under a unique name so it never "restores" a previous attempt behind forge's back.
            name=f"forge-{uuid.uuid4().hex[:12]}",
            storage_path=os.path.join(tempfile.gettempdir(), "forge-ray-train"),
            failure_config=ray.train.FailureConfig(max_failures=spec.trainer.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; show the cause, not the wrapping
        raise unwrap_failure(exc) from None
    finally:
        stop.set()
        pump.join(timeout=5)
        _drain(queue, handle)
        queue.shutdown()
    if result.error is not None:
        raise unwrap_failure(result.error)
    summary.pop("event", None)
    return summary


def _pump(queue: Any, on_progress: ProgressFn, stop: threading.Event) -> None:
    from ray.util.queue import Empty

    while not stop.is_set():
        try:
            on_progress(queue.get(timeout=0.5))
        except Empty:
            continue
        except Exception:  # the queue actor died with the cluster; nothing left to show
            return


def _drain(queue: Any, on_progress: ProgressFn) -> None:
    try:
        while not queue.empty():
            on_progress(queue.get_nowait())
    except Exception:
        pass


def unwrap_failure(exc: BaseException) -> ForgeError:
    """The worker's own exception: forge errors as they were raised, others summarized."""
    root = _root_cause(exc)
    if isinstance(root, ForgeError):
        return root
    where = ""
    tb = root.__traceback__
    while tb is not None:  # the innermost frame is where it actually went wrong
        where = f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return TrainingError(
        f"Training failed on a worker: {type(root).__name__}: {root}{where}. "
        "Run again with verbose=true to see the workers' full logs."
    )


def _root_cause(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)  # Ray Train V2 WorkerGroupError
        if failures:
            exc = next(iter(failures.values()))
            continue
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        if isinstance(cause, BaseException):
            exc = cause
            continue
        if exc.__cause__ is not None:
            exc = exc.__cause__
            continue
        break
    return exc
