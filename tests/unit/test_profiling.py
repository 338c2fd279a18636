"""trainer.profile_steps: the window of steps profiled, what lands in the run folder, refusals."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest
import torch

from forge.config.compose import compose
from forge.config.specs import LaunchPlan
from forge.config.validate import to_run_spec
from forge.errors import ConfigError
from forge.loop import WorkerContext, run_loop
from forge.profiling import NEVER, StepProfiler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def windows_seen(window: tuple[int, int] | None, start_step: int, end_step: int) -> list[int]:
    """The steps a StepProfiler profiles when the loop drives it from start_step to end_step."""
    files: dict[str, bytes] = {}
    prof = StepProfiler(window, torch.device("cpu"), files.__setitem__, start_step=start_step)
    for step in range(start_step, end_step + 1):  # start_step: before the first step
        if step == prof.edge:
            prof.at_step(step)
    prof.close(end_step)
    if not files:
        return []
    summary = json.loads(files["rank0.summary.json"])
    return list(range(summary["first_step"], summary["last_step"] + 1))


def test_the_window_is_the_steps_asked_for() -> None:
    assert windows_seen((3, 5), 0, 10) == [3, 4, 5]
    assert windows_seen((1, 2), 0, 10) == [1, 2]
    assert windows_seen((4, 4), 0, 10) == [4]
    # a resumed run: the part of the window still ahead, or nothing once it is over
    assert windows_seen((3, 8), 5, 10) == [6, 7, 8]
    assert windows_seen((3, 5), 5, 10) == []
    # training ends inside the window: what was profiled is written
    assert windows_seen((3, 8), 0, 6) == [3, 4, 5, 6]
    assert StepProfiler(None, torch.device("cpu"), print).edge == NEVER


def run_digits(storage: Path, run: Path, window: str) -> dict:
    """12 steps of the digits recipe in this process, profiling ``window`` (e.g. "[5,8]")."""
    spec = to_run_spec(
        compose(
            [
                "experiment=digits",
                f"storage.uri={storage}",
                "trainer.max_steps=12",
                "trainer.val_every_n_steps=0",
                "checkpoint.every_n_steps=0",
                "recipe.params.channels=4",
                f"trainer.profile_steps={window}",
            ]
        )
    )
    plan = LaunchPlan(run_uri=str(run), resume_from=None, config_hash="x", launch_time=time.time())
    return run_loop(spec, plan, WorkerContext())


def test_a_run_with_profile_steps_writes_summary_table_and_trace(tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = run_digits(tmp_path, run, "[5,8]")
    assert summary["step"] == 12
    profile = json.loads((run / "profile/rank0.summary.json").read_text())
    assert (profile["first_step"], profile["last_step"], profile["steps"]) == (5, 8, 4)
    assert profile["wall_ms_per_step"] > 0 and profile["device_busy_ms_per_step"] is None
    names = {op["name"] for op in profile["top"]}
    assert "aten::convolution_backward" in names or "aten::mm" in names, names
    assert "Name" in (run / "profile/rank0.table.txt").read_text()
    trace = json.loads(gzip.decompress((run / "profile/rank0.trace.json.gz").read_bytes()))
    assert trace["traceEvents"]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("trainer.profile_steps=[8,5]", "its first step comes after its last"),
        ("trainer.profile_steps=[5,400]", "its last step is past trainer.max_steps=300"),
        ("trainer.profile_steps=[10]", "trainer.profile_steps=[10] is not [first,last]"),
        ("trainer.profile_steps=[0,5]", "is not [first,last], two optimizer steps >= 1"),
    ],
)
def test_a_window_outside_the_run_is_refused(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        to_run_spec(compose(["experiment=digits", "trainer.max_steps=300", override]))


def test_a_run_that_fails_inside_the_window_leaves_no_profiler_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import forge.strategies.ddp

    real_step, calls = forge.strategies.ddp.scaled_step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("step 5 failed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(forge.strategies.ddp, "scaled_step", failing_step)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="step 5 failed"):
        run_digits(tmp_path, run, "[2,10]")
    assert torch.autograd.profiler._is_profiler_enabled is False
    assert not (run / "profile").exists()
