"""What a person sees: rank 0's progress on the driver's console, and one summary at the end."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def make_console() -> Console:
    """stderr console; when not a terminal (CI, logs), lines are never wrapped mid-path."""
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=10_000, soft_wrap=True)
    return console


class ConsoleProgress:
    """Renders progress events from rank 0: a live bar on a terminal, plain lines elsewhere.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> p = ConsoleProgress(Console(file=out, width=200))
        >>> p({"event": "start", "total_steps": 10, "step": 0})
        >>> p({"event": "log", "step": 5, "train/loss": 0.5, "throughput/samples_per_s": 100.0})
        >>> p({"event": "checkpoint", "step": 5, "uri": "runs/a/checkpoints/step_00000005"})
        >>> p.close()
        >>> print(out.getvalue().replace("eta 0s", "eta ?"), end="")
        step 5/10  train/loss 0.5  samples/s 100  eta ?
        step 5  checkpoint committed: runs/a/checkpoints/step_00000005
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or make_console()
        self.total: int | None = None
        self.bar: Progress | None = None
        self.task: Any = None
        self.started = time.time()
        self.start_step = 0

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            self.total, self.start_step = event["total_steps"], event["step"]
            self.started = time.time()
            if self.console.is_terminal and self.bar is None:
                self.bar = Progress(
                    TextColumn("[bold]step {task.completed}/{task.total}"),
                    BarColumn(),
                    TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(),
                    TextColumn("eta"),
                    TimeRemainingColumn(),
                    console=self.console,
                    transient=False,
                )
                self.bar.start()
                self.task = self.bar.add_task(
                    "train", total=self.total, completed=event["step"], info=""
                )
        elif kind == "log":
            info = _format_metrics(event)
            if self.bar is not None:
                self.bar.update(self.task, completed=event["step"], info=info)
            else:
                self.console.print(
                    f"step {event['step']}/{self.total}  {info}  eta {self._eta(event['step'])}"
                )
        elif kind == "val":
            self._print(f"step {event['step']}  validation  {_format_metrics(event)}")
        elif kind == "checkpoint":
            self._print(f"step {event['step']}  checkpoint committed: {escape(str(event['uri']))}")
        elif kind == "resumed":
            self._print(f"resumed from {escape(str(event['uri']))} at step {event['step']}")
        elif kind == "warning":
            # Workers' messages quote library errors verbatim; gloo's carry "[/path/pair.cc:537]",
            # which rich would read as a closing tag and raise MarkupError mid-run.
            self._print(f"[yellow]warning:[/] {escape(str(event['message']))}")
        elif kind == "info":
            self._print(escape(str(event["message"])))

    def _print(self, text: str) -> None:
        (self.bar.console if self.bar is not None else self.console).print(text)

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if not self.total or done <= 0:
            return "?"
        left = (time.time() - self.started) / done * (self.total - step)
        return f"{left:.0f}s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _format_metrics(event: dict[str, Any]) -> str:
    parts = []
    for name, value in event.items():
        if name in {"event", "step", "epoch"} or not isinstance(value, (int, float)):
            continue
        short = name.replace("throughput/", "").replace("_per_s", "/s")
        parts.append(f"{short} {value:.4g}")
    return "  ".join(parts)


def print_summary(console: Console, result: Any) -> None:
    """One concise table: final metrics, where things are, and what to run next."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in sorted(result.metrics.items()):
        table.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value))
    table.add_row("step", str(result.global_step))
    if result.step_time_s:
        table.add_row("step time", f"{result.step_time_s * 1000:.1f} ms (median)")
    if result.time_to_first_step_s:
        table.add_row("first step after", f"{result.time_to_first_step_s:.1f} s")
    table.add_row("wall time", f"{result.wall_time_s:.1f} s")
    table.add_row("run folder", result.run_dir)
    table.add_row("last checkpoint", str(result.last_checkpoint))
    if result.best_checkpoint:
        table.add_row("best checkpoint", result.best_checkpoint)
    table.add_row("resume", result.resume_command)
    if result.last_checkpoint:
        # Every strategy's checkpoint (DDP's full file, FSDP/ZeRO per-rank fragments, Lightning's)
        # becomes one full-precision state dict this way.
        table.add_row(
            "load weights",
            f"forge.checkpoint.consolidate({result.last_checkpoint!r})",
        )
    console.print("[bold green]Training finished[/]")
    console.print(table)
