"""``trainer.profile_steps``: torch.profiler over a window of optimizer steps, on rank 0.

Where a step's time goes, in the run folder (``profile/``) rather than in a notebook:

* ``rank0.summary.json``: wall time per step, the device's busy time per step (kernels and
  copies, summed; the rest of the wall time the device sat idle waiting for the host), and the
  top operations by device time (by CPU time on a CPU run);
* ``rank0.table.txt``: the profiler's ``key_averages()`` table;
* ``rank0.trace.json.gz``: the Chrome/Perfetto trace (``chrome://tracing``, ui.perfetto.dev).

The loop calls :meth:`StepProfiler.at_step` only when the step equals :attr:`StepProfiler.edge`
(one integer comparison per step, nothing else when profiling is off). Wall time is measured
between two device syncs, the only ones profiling adds.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

PROFILE_DIR = "profile"
TOP_OPS = 15
NEVER = -1  # the edge when there is nothing (more) to do


def summarize(events: Any, steps: int, wall_s: float, device_type: str) -> dict[str, Any]:
    """Per-step figures from a profiler's ``key_averages()``.

    Args:
        events: ``prof.key_averages()`` of a window of ``steps`` steps.
        steps: How many steps the window held.
        wall_s: The window's wall time in seconds (between device syncs).
        device_type: ``"cuda"`` (device time of kernels and copies) or ``"cpu"`` (CPU time).

    Returns:
        ``wall_ms_per_step``; ``device_busy_ms_per_step`` and ``device_busy_fraction`` (of the
        wall time; None on CPU); ``top``: up to :data:`TOP_OPS` entries of ``name``,
        ``ms_per_step`` and ``share`` (of the busy time, or of the CPU time on CPU).

    Example:
        >>> from torch.profiler import profile
        >>> with profile() as prof:
        ...     _ = torch.ones(64, 64) @ torch.ones(64, 64)
        >>> s = summarize(prof.key_averages(), steps=1, wall_s=0.01, device_type="cpu")
        >>> s["wall_ms_per_step"], s["device_busy_ms_per_step"], s["top"][0]["name"]
        (10.0, None, 'aten::mm')
    """
    on_device = device_type != "cpu"
    if on_device:
        # Kernels, copies and memsets are the device-side events; the CPU ops that launched
        # them carry the same time again, so only device events are summed.
        timed = [
            (e.key, e.self_device_time_total)
            for e in events
            if e.device_type != torch.autograd.DeviceType.CPU and e.self_device_time_total > 0
        ]
    else:
        timed = [(e.key, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]
    total_us = sum(us for _, us in timed)
    busy_ms = total_us / 1e3 / steps if on_device else None
    wall_ms = wall_s * 1e3 / steps
    top = sorted(timed, key=lambda item: item[1], reverse=True)[:TOP_OPS]
    return {
        "steps": steps,
        "wall_ms_per_step": round(wall_ms, 3),
        "device_busy_ms_per_step": round(busy_ms, 3) if busy_ms is not None else None,
        "device_busy_fraction": round(busy_ms / wall_ms, 4) if busy_ms is not None else None,
        "top": [
            {
                "name": name,
                "ms_per_step": round(us / 1e3 / steps, 3),
                "share": round(us / total_us, 4) if total_us else 0.0,
            }
            for name, us in top
        ],
    }


class StepProfiler:
    """Profiles optimizer steps ``first..last`` (1-based, inclusive) and writes the results.

    Args:
        window: ``(first, last)``, or None for no profiling.
        device: The training device (its type decides which events are summed).
        write: ``(name, data)`` -> stores a file under the run folder's ``profile/``.
        start_step: The step the run starts from (a resumed run: the window starts at once if
            it began before, and nothing is profiled if it is already over).

    Example:
        >>> files = {}
        >>> prof = StepProfiler((2, 3), torch.device("cpu"), files.__setitem__)
        >>> for step in range(0, 5):  # step 0: before the first step; then after each step
        ...     if step == prof.edge:
        ...         prof.at_step(step)
        ...     _ = torch.ones(8, 8) @ torch.ones(8, 8)
        >>> sorted(files), json.loads(files["rank0.summary.json"])["steps"]
        (['rank0.summary.json', 'rank0.table.txt', 'rank0.trace.json.gz'], 2)
    """

    def __init__(
        self,
        window: tuple[int, int] | None,
        device: torch.device,
        write: Callable[[str, bytes], None],
        start_step: int = 0,
    ) -> None:
        self.window = window
        self.device = device
        self.write = write
        self._prof: Any = None
        self._started_at = 0.0
        self._first = 0
        if window is None or start_step >= window[1]:
            self.edge = NEVER
        else:
            self.edge = max(window[0] - 1, start_step)

    def at_step(self, step: int) -> None:
        """Call when ``step`` (the optimizer steps finished so far) equals :attr:`edge`."""
        if self.window is None:
            return
        if self._prof is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._sync()
            self._prof = profile(activities=activities)
            self._prof.__enter__()
            self._started_at = time.perf_counter()
            self._first = step + 1
            self.edge = self.window[1]
        else:
            self.close(step)

    def close(self, step: int) -> None:
        """Stop (at the end of the run, too, if the window was not over) and write the files."""
        if self._prof is None:
            self.edge = NEVER
            return
        self._sync()
        wall_s = time.perf_counter() - self._started_at
        prof = self._stop()
        steps = step - self._first + 1
        if steps < 1:
            return
        events = prof.key_averages()
        summary = summarize(events, steps, wall_s, self.device.type)
        summary["first_step"], summary["last_step"] = self._first, step
        sort = "self_device_time_total" if self.device.type != "cpu" else "self_cpu_time_total"
        self.write("rank0.summary.json", json.dumps(summary, indent=1).encode())
        table = events.table(sort_by=sort, row_limit=80, max_name_column_width=100)
        self.write("rank0.table.txt", table.encode())
        with tempfile.TemporaryDirectory(prefix="forge-profile-") as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path, "rb") as f:
                self.write("rank0.trace.json.gz", gzip.compress(f.read(), compresslevel=5))

    def abandon(self) -> None:
        """Stop profiling without writing anything (training failed inside the window)."""
        self._stop()

    def _stop(self) -> Any:
        """Turn the profiler off (if on) and profile nothing more; returns it (or None)."""
        prof, self._prof, self.edge = self._prof, None, NEVER
        if prof is not None:
            prof.__exit__(None, None, None)
        return prof

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
