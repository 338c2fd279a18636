"""Rank 0's metric log: JSON lines (machine-readable) and TensorBoard, in the run folder.

For a run folder in object storage the files are written to a local staging folder and
uploaded (:meth:`MetricsWriter.sync`) after each checkpoint commit and when the writer closes;
see :func:`open_run_metrics`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

#: Seconds between the TensorBoard thread's batches of rows (a row waits for the next log after
#: that, or for :meth:`MetricsWriter.sync` / ``close``). TensorBoard's own writer flushes its
#: files every 120 s, so batching is not visible; waking the thread once per row cost the
#: training thread about 0.3 ms of CPU per row on top of the thread's own 0.35 ms
#: (``/tmp`` profile of the digits experiment logging every step, one process).
TENSORBOARD_BATCH_S = 2.0


class MetricsWriter:
    """Append ``{"step": ..., "time": ..., name: value}`` rows to ``metrics.jsonl`` and TensorBoard.

    The JSON line is written at once. TensorBoard's events (one per row, all its scalars in one
    summary) are built and written by a thread of their own, in batches at most every
    :data:`TENSORBOARD_BATCH_S` seconds, which keeps TensorBoard's import and its pure-Python
    record checksums off the training thread, and the thread's wake-ups rare. :meth:`sync` and
    :meth:`close` write every row logged so far first.

    Args:
        local_dir: A local folder (the run folder itself for local storage).
        resume_step: The step training (re)starts from, when the folder may hold rows of an
            earlier attempt: rows past it are dropped from ``metrics.jsonl`` (and a torn last
            line), and TensorBoard purges its events past it (``purge_step``), so a restarted
            run has one row per step. None appends to whatever is there.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with MetricsWriter(d, tensorboard=False) as w:
        ...     w.log(1, {"train/loss": 0.5})
        >>> open(os.path.join(d, "metrics.jsonl")).read().count("train/loss")
        1
    """

    def __init__(
        self,
        local_dir: str,
        tensorboard: bool = True,
        *,
        mirror_uri: str | None = None,
        storage_options: Any = None,
        resume_step: int | None = None,
    ) -> None:
        os.makedirs(local_dir, exist_ok=True)
        self.local_dir = local_dir
        self.mirror_uri = mirror_uri
        self._options = storage_options
        self._synced: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)
        self._sync_lock = threading.Lock()
        self.path = os.path.join(local_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, "rb") as f:
                kept = rows_up_to(f.read(), resume_step)
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(kept)
            os.replace(tmp, self.path)  # a crash here leaves the old file or the new, never half
        self._file = open(self.path, "a", buffering=1)  # line-buffered: tail -f works
        self._resume_step = resume_step
        self._tb: Any = None
        self._tb_thread: ThreadPoolExecutor | None = None  # one thread: events stay in order
        # Rows for TensorBoard, (step, wall time, metrics): appended here, taken by that thread.
        self._tb_rows: deque[tuple[int, float, dict[str, Any]]] = deque()
        self._tb_next_batch = 0.0  # time.monotonic() after which a log() starts a batch
        if tensorboard:
            self._tb_thread = ThreadPoolExecutor(1, thread_name_prefix="forge-tensorboard")
            self._tb_opened = self._tb_thread.submit(self._open_tensorboard)

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard drops events at steps >= purge_step from the folder's older files.
        purge = None if self._resume_step is None else self._resume_step + 1
        self._tb = SummaryWriter(os.path.join(self.local_dir, "tensorboard"), purge_step=purge)

    def _write_tensorboard_rows(self) -> None:
        """On the TensorBoard thread: write the rows logged so far, one event per row."""
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import scalar

        rows = self._tb_rows
        if self._tb is None:  # it failed to open: that error is raised by sync/close
            rows.clear()
            return
        # What add_scalar does per scalar, but one event for the whole row: each event costs a
        # queue hop and two pure-Python CRC32Cs (330 us per 5-scalar row as 5 events, 96 as one).
        events = self._tb._get_file_writer()
        while rows:  # a deque: log() appends on another thread while this pops
            step, wall_time, metrics = rows.popleft()
            values = [
                value
                for name, x in metrics.items()
                if isinstance(x, (int, float))
                for value in scalar(name, x).value
            ]
            if values:
                events.add_summary(Summary(value=values), step, wall_time)

    def _tb_call(self, fn: Any, *args: Any) -> None:
        """Run ``fn`` on the TensorBoard thread after the writes queued before it; wait."""
        if self._tb_thread is not None:
            self._tb_thread.submit(fn, *args).result()
            self._tb_opened.result()  # raises here if TensorBoard failed to open

    def log(self, step: int, metrics: dict[str, Any], wall_time: float | None = None) -> None:
        """Append a row: the JSON line now, TensorBoard within :data:`TENSORBOARD_BATCH_S`.

        Args:
            step: The optimizer step the row belongs to (TensorBoard's x axis).
            metrics: Name to value; TensorBoard gets the ``int``/``float`` ones.
            wall_time: When the row's values were taken (``time.time()``; default: now), for a
                row logged after its step (the train loss is reduced across ranks in batches).
        """
        now = time.time() if wall_time is None else wall_time
        row = {"step": step, "time": round(now, 3), **metrics}
        self._file.write(json.dumps(row) + "\n")
        if self._tb_thread is not None:
            self._tb_rows.append((step, now, dict(metrics)))
            tick = time.monotonic()
            if tick >= self._tb_next_batch:
                self._tb_next_batch = tick + TENSORBOARD_BATCH_S
                self._tb_thread.submit(self._write_tensorboard_rows)

    def _flush_tensorboard(self, close: bool = False) -> None:
        self._write_tensorboard_rows()
        if self._tb is not None and close:
            self._tb.close()
        elif self._tb is not None:
            self._tb.flush()

    def sync(self) -> None:
        """Upload new or grown files to ``mirror_uri`` (nothing for a local run folder).

        Safe to call from a background thread while :meth:`log` appends: a partly written last
        line is left for the next sync.
        """
        if self.mirror_uri is None:
            return
        from forge.checkpoint import storage

        with self._sync_lock:
            if not self._file.closed:
                self._tb_call(self._flush_tensorboard)
            for folder, _, names in os.walk(self.local_dir):
                for name in names:
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, self.local_dir).replace(os.sep, "/")
                    stat = os.stat(path)
                    if self._synced.get(rel) == (stat.st_size, stat.st_mtime_ns):
                        continue
                    with open(path, "rb") as f:
                        data = f.read()
                    if rel == "metrics.jsonl":
                        data = data[: data.rfind(b"\n") + 1]
                    storage.write_bytes(storage.join(self.mirror_uri, rel), data, self._options)
                    self._synced[rel] = (stat.st_size, stat.st_mtime_ns)

    def close(self, upload: bool = True) -> None:
        """Close the files; a mirrored writer uploads them one last time and drops its staging.

        Args:
            upload: False when an error is on its way up: the files are completed locally but
                not uploaded (storage may be what failed; the rows of a mirrored writer since
                its last :meth:`sync` are dropped, as a killed worker's would be).
        """
        with self._sync_lock:  # not while a background sync flushes TensorBoard
            if self._file.closed:
                return
            self._file.close()
            if self._tb_thread is not None:
                self._tb_call(self._flush_tensorboard, True)
                self._tb_thread.shutdown()
        if self.mirror_uri is not None:
            if upload:
                self.sync()
            shutil.rmtree(self.local_dir, ignore_errors=True)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rows_up_to(data: bytes, step: int) -> bytes:
    r"""The lines of a ``metrics.jsonl`` whose ``step`` is at most ``step``; a torn (unparsable)
    line, as a killed writer leaves, is dropped too.

    Example:
        >>> rows_up_to(b'{"step": 1}\n{"step": 2}\n{"ste', 1)
        b'{"step": 1}\n'
    """
    kept = []
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line if line.endswith(b"\n") else line + b"\n")
    return b"".join(kept)


def open_run_metrics(
    run_uri: str,
    storage_options: Any = None,
    tensorboard: bool = True,
    resume_step: int | None = None,
) -> MetricsWriter:
    """The metrics writer of a run folder, local or in object storage.

    A local run folder is written directly. For a remote one the writer stages files in a
    temporary folder, continuing the run's existing ``metrics.jsonl`` (a resumed run), and
    uploads them on :meth:`MetricsWriter.sync` and :meth:`MetricsWriter.close`. With
    ``resume_step``, rows past it are dropped (see :class:`MetricsWriter`).

    Example:
        >>> w = open_run_metrics("memory://doc-metrics/run", tensorboard=False)
        >>> w.log(1, {"train/loss": 0.5})
        >>> w.close()
        >>> from forge.checkpoint import storage
        >>> storage.read_bytes("memory://doc-metrics/run/metrics.jsonl").count(b"train/loss")
        1
    """
    from forge.checkpoint import storage

    if not storage.is_remote(run_uri):
        return MetricsWriter(storage.normalize(run_uri), tensorboard, resume_step=resume_step)
    staging = tempfile.mkdtemp(prefix="forge-metrics-")
    try:
        previous = storage.read_bytes(storage.join(run_uri, "metrics.jsonl"), storage_options)
    except FileNotFoundError:
        previous = b""
    with open(os.path.join(staging, "metrics.jsonl"), "wb") as f:
        f.write(previous)
    return MetricsWriter(
        staging,
        tensorboard,
        mirror_uri=run_uri,
        storage_options=storage_options,
        resume_step=resume_step,
    )


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
