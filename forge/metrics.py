"""Rank 0's metric log: JSON lines (machine-readable) and TensorBoard, in the run folder."""

from __future__ import annotations

import json
import os
import time
from typing import Any


class MetricsWriter:
    """Append ``{"step": ..., "time": ..., name: value}`` rows to ``metrics.jsonl`` and TensorBoard.

    Args:
        local_dir: A local folder (the run folder itself for local storage).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with MetricsWriter(d, tensorboard=False) as w:
        ...     w.log(1, {"train/loss": 0.5})
        >>> open(os.path.join(d, "metrics.jsonl")).read().count("train/loss")
        1
    """

    def __init__(self, local_dir: str, tensorboard: bool = True) -> None:
        os.makedirs(local_dir, exist_ok=True)
        self.path = os.path.join(local_dir, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1)  # line-buffered: tail -f works
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(local_dir, "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
