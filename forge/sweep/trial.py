"""What one Tune trial runs: a forge driver (compose -> validate -> plan -> launch).

The trial is a Tune *function trainable* that calls :func:`forge.api.train`, which builds its
own TorchTrainer (Ray Train V2 refuses a Trainer passed to a Tuner; a driver function is its
supported Train-in-Tune pattern). Training runs in a thread of the trial; the trial's own thread
turns forge's progress events into ``tune.report`` calls:

* every validation is reported with ``step`` (forge's optimizer step, never decreasing) as the
  schedulers' time attribute;
* the checkpoint Tune sees is a pointer: ``forge_checkpoint.json`` with the URI of forge's
  committed checkpoint, never its bytes (forge's store is the one owner of checkpoint bytes);
* the run folder is named after the trial id, so a restarted trial continues its own run
  (``resume=auto``); a PBT trial that clones another's checkpoint starts a new run folder from
  that checkpoint (``resume=<uri>``) with its mutated hyperparameters, and records where it came
  from in ``sweep_trial.json``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from forge.sweep.grammar import ParsedSweep, point_overrides
from forge.sweep.release import LOCK_KEY, RESULT_KEY

POINTER_FILE = "forge_checkpoint.json"
FINAL_KEY = "forge_final"  # True on a trial's last report: its forge run has finished
TRIAL_FILE = "sweep_trial.json"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of one sweep shares (shipped to trials with ``tune.with_parameters``)."""

    parsed: ParsedSweep
    sweep_uri: str
    metric: str
    mode: str
    monitor_overrides: tuple[str, ...] = ()
    config_dir: str | None = None


def trial_overrides(
    setup: TrialSetup, values: dict[str, Any], run_name: str, resume: str
) -> list[str]:
    """The overrides of one trial's forge run (its point, its folder, how it resumes).

    Example:
        >>> from forge.sweep.grammar import parse_sweep
        >>> s = TrialSetup(parse_sweep(["seed=0,1"]), "/tmp/sw", "val/loss", "min")
        >>> trial_overrides(s, {"seed": 1}, "trial-ab", "auto")
        ['seed=1', 'storage.uri=/tmp/sw', 'run_name=trial-ab', 'resume=auto']
    """
    return [
        *point_overrides(setup.parsed, values),
        *setup.monitor_overrides,
        f"storage.uri={setup.sweep_uri}",
        f"run_name={run_name}",
        f"resume={resume}",
    ]


def decide_run(
    trial_id: str, pointer: dict[str, Any] | None, has_checkpoints: Any
) -> tuple[str, str, str | None]:
    """Which run folder a trial (re)starts in, and from what.

    Args:
        trial_id: Tune's trial id.
        pointer: The checkpoint pointer Tune restored this trial with (None on a first start).
        has_checkpoints: ``run_name -> bool``: does that run folder already hold a committed
            checkpoint (then it is continued, never overwritten).

    Returns:
        ``(run_name, resume, cloned_from)``: ``resume`` is ``auto`` or a checkpoint URI;
        ``cloned_from`` is the URI a PBT exploit starts from (None otherwise).

    Example:
        >>> decide_run("t1", None, lambda n: False)
        ('trial-t1', 'auto', None)
        >>> p = {"uri": "/s/trial-t2/step_10", "run_name": "trial-t2", "step": 10, "trial_id": "t2"}
        >>> decide_run("t1", p, lambda n: False)
        ('trial-t1-from-t2-10', '/s/trial-t2/step_10', '/s/trial-t2/step_10')
        >>> decide_run("t1", {"uri": "/s/trial-t1/step_00000010", "run_name": "trial-t1"}, None)
        ('trial-t1', 'auto', None)
    """
    own = f"trial-{trial_id}"
    if pointer is None:
        return own, "auto", None
    source = pointer["run_name"]
    if source == own or source.startswith(own + "-from-"):
        return source, "auto", None  # a restart of this trial: continue its own run
    origin = pointer.get("trial_id") or source
    run_name = f"{own}-from-{origin}-{pointer.get('step', 0)}"
    if has_checkpoints(run_name):  # this exploit already started once: continue it
        return run_name, "auto", None
    return run_name, pointer["uri"], pointer["uri"]


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune function trainable: one forge run at the point ``config``, reporting to Tune."""
    from ray import tune

    from forge.api import train
    from forge.checkpoint import storage
    from forge.checkpoint.storage import StorageOptions
    from forge.checkpoint.store import CheckpointStore
    from forge.config.compose import compose
    from forge.config.validate import to_run_spec
    from forge.progress import make_console

    trial_id = tune.get_context().get_trial_id()
    values = {d.name: config[d.name] for d in setup.parsed.dims}
    pointer = _read_pointer(tune.get_checkpoint())
    probe_cfg = compose(trial_overrides(setup, values, "probe", "auto"), setup.config_dir)
    options = StorageOptions.from_spec(to_run_spec(probe_cfg).storage)

    def has_checkpoints(name: str) -> bool:
        return bool(
            CheckpointStore(storage.join(setup.sweep_uri, name), options=options).committed()
        )

    run_name, resume, cloned_from = decide_run(trial_id, pointer, has_checkpoints)
    overrides = trial_overrides(setup, values, run_name, resume)
    cfg = compose(overrides, setup.config_dir)
    run_uri = storage.join(setup.sweep_uri, run_name)
    spec = to_run_spec(cfg)
    if resume == "auto":
        # A driver killed after this trial's run finished but before Tune saved that in its
        # experiment state restarts the trial: report the finished run, never touch it again.
        done = finished_run(run_uri, spec.trainer.max_steps, options)
        if done is not None:
            row, ckpt_uri, ckpt_step = done
            reporter = _Reporter(setup, run_name, run_uri, trial_id, pointer)
            reporter.checkpoints[ckpt_step] = ckpt_uri
            reporter.pending = row
            reporter.flush(final=True)
            return
    record = {
        "trial_id": trial_id,
        "values": values,
        "overrides": overrides,
        "cloned_from": cloned_from,
        "cloned_from_trial": pointer.get("trial_id") if cloned_from and pointer else None,
    }
    storage.write_bytes(
        storage.join(run_uri, TRIAL_FILE), json.dumps(record, indent=2).encode(), options
    )

    from ray.util.queue import Queue

    events: queue.Queue[dict[str, Any] | None] = queue.Queue()
    outcome: dict[str, Any] = {}
    # Rank 0 waits at each validation until its step arrives here (after Tune took the report).
    acks = Queue(actor_options={"num_cpus": 0})

    def train_thread() -> None:
        try:
            with open(os.devnull, "w") as sink:  # the trial's console: the driver shows the table
                from rich.console import Console

                console = Console(file=sink) if not cfg.get("verbose") else make_console()
                outcome["result"] = train(
                    cfg,
                    overrides=overrides,
                    console=console,
                    on_progress=events.put,
                    report_acks=acks,
                )
        except BaseException as exc:  # handed to the trial's thread, which Tune watches
            outcome["error"] = exc
        finally:
            events.put(None)

    worker = threading.Thread(target=train_thread, name=f"forge-{run_name}", daemon=True)
    worker.start()
    reporter = _Reporter(setup, run_name, run_uri, trial_id, pointer, ack=acks.put)
    reporter.checkpoint_every = spec.checkpoint.every_n_steps
    while True:
        event = events.get()
        if event is None:
            break
        reporter.handle(event)
    worker.join()
    # The final validation is reported only now, when forge has committed the last checkpoint
    # and released the run folder: a scheduler stops a trial at its last report.
    reporter.flush(final="error" not in outcome)
    if "error" in outcome:
        raise outcome["error"]


def finished_run(
    run_uri: str, max_steps: int | None, options: Any = None
) -> tuple[dict[str, Any], str, int] | None:
    """The last validation row and final checkpoint of a run that reached ``max_steps``.

    Returns:
        ``(row, checkpoint_uri, checkpoint_step)``, or None when the run is not finished (no
        committed checkpoint at ``max_steps``) or logged no validation.
    """
    from forge.checkpoint import storage
    from forge.checkpoint.store import CheckpointStore

    if not max_steps:
        return None
    ckpt = CheckpointStore(run_uri, options=options).latest(verify=False)
    if ckpt is None or ckpt.step < max_steps:
        return None
    metrics_uri = storage.join(run_uri, "metrics.jsonl")
    if not storage.exists(metrics_uri, options):
        return None
    lines = storage.read_bytes(metrics_uri, options).decode().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    vals = [r for r in rows if any(k.startswith("val/") for k in r)]
    if not vals:
        return None
    return {"event": "val", **vals[-1]}, ckpt.uri, ckpt.step


class _Reporter:
    """Turns forge progress events into ``tune.report`` calls (on the trial's own thread)."""

    def __init__(
        self,
        setup: TrialSetup,
        run_name: str,
        run_uri: str,
        trial_id: str,
        pointer: dict[str, Any] | None,
        ack: Any = None,
    ) -> None:
        self.setup = setup
        self.ack = ack  # tells rank 0 that the report of a step is settled (it may go on)
        self.run_name = run_name
        self.run_uri = run_uri
        self.trial_id = trial_id
        # Never report a step twice or backwards after a restart (schedulers' time attribute).
        self.last_step = (
            int(pointer.get("step", -1)) if pointer and run_name == pointer.get("run_name") else -1
        )
        self.train: dict[str, float] = {}
        self.pending: dict[str, Any] | None = None
        self.checkpoints: dict[int, str] = {}
        self.reported_ckpt: str | None = None
        self.total_steps: int | None = None
        self.checkpoint_every = 0
        self.placement_group: str | None = None  # the run's workers' (forge.sweep.release)
        self.lock_token: str | None = None  # the run folder's lock, held by this trial's run

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "placement_group":
            self.placement_group = event.get("id")
            self.lock_token = event.get("lock_token")
        elif kind == "start":
            self.total_steps = event.get("total_steps")
        elif kind == "log":
            self.train = {k: v for k, v in event.items() if k in ("train/loss", "lr")}
        elif kind == "val":
            self.flush()
            self.pending = event
            step, every = int(event["step"]), self.checkpoint_every
            if step == self.total_steps:
                pass  # the last report waits until the run has finished (see run_trial)
            elif not (every and step % every == 0):
                self.flush()  # no checkpoint due at this step: report now
        elif kind == "checkpoint":
            self.checkpoints[int(event["step"])] = event["uri"]
            step = int(event["step"])
            if self.pending is not None and int(self.pending["step"]) == step != self.total_steps:
                self.flush()  # the validation and the checkpoint of the same step, together
        elif kind == "report":
            # Rank 0 has committed this step's checkpoint (if one was due) and now waits: the
            # report goes to Tune, and once tune.report returns, training may go on.
            if self.pending is not None and int(self.pending["step"]) == int(event["step"]):
                self.flush()
            if self.ack is not None:
                self.ack(int(event["step"]))

    def flush(self, final: bool = False) -> None:
        """Report the pending validation to Tune; ``final`` marks the run's last report
        (:data:`FINAL_KEY`: Tune stops the trial there, never pauses it; see forge.sweep.run)."""
        from ray import tune

        event, self.pending = self.pending, None
        if event is None:
            return
        step = int(event["step"])
        if step <= self.last_step:
            return
        self.last_step = step
        metrics = {k: v for k, v in event.items() if k.startswith("val/")}
        metrics.update(self.train)
        metrics.update({"step": step, "run_dir": self.run_uri, FINAL_KEY: final})
        if self.placement_group:
            metrics[RESULT_KEY] = self.placement_group
        if self.lock_token:
            metrics[LOCK_KEY] = self.lock_token
        checkpoint = None
        newest = max(self.checkpoints) if self.checkpoints else None
        if newest is not None and self.checkpoints[newest] != self.reported_ckpt:
            self.reported_ckpt = self.checkpoints[newest]
            pointer = {
                "uri": self.reported_ckpt,
                "step": newest,
                "run_name": self.run_name,
                "trial_id": self.trial_id,
            }
            folder = tempfile.mkdtemp(prefix="forge-pointer-")
            with open(os.path.join(folder, POINTER_FILE), "w") as f:
                json.dump(pointer, f)
            checkpoint = tune.Checkpoint.from_directory(folder)
        try:
            tune.report(metrics, checkpoint=checkpoint)  # returns when Tune lets the trial go on
        finally:
            if checkpoint is not None:  # Tune has copied the pointer into the sweep folder
                shutil.rmtree(checkpoint.path, ignore_errors=True)


def _read_pointer(checkpoint: Any) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, POINTER_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)
