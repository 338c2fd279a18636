"""Finding and reading a file source on the driver: Parquet or CSV, local or ``s3://``.

``data.source`` is a file, a folder (every file of the format under it) or a glob. The files
are listed once (:func:`resolve`) with their size and version (S3 ETag or local mtime) for the
fingerprint; that list, not the pattern, is what Ray Data reads on the workers, so the driver's
checks and the training run see the same files. S3 goes through the checkpoint store's
filesystem (:mod:`forge.checkpoint.storage`: ``storage.endpoint_url``/``storage.region``,
credentials from the AWS chain, retried listings).

The driver's own pass over the data (contract check, profile) streams one record batch at a
time with pyarrow, the reader Ray Data itself uses for these formats, so it needs no cluster
(``python -m forge validate-data`` runs anywhere) and never holds the whole data.
"""

from __future__ import annotations

import glob as globlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from forge.checkpoint import storage
from forge.checkpoint.storage import StorageOptions
from forge.errors import ConfigError

EXTENSIONS = {"parquet": (".parquet", ".pq"), "csv": (".csv", ".csv.gz", ".tsv")}
SCAN_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: its full URI (or absolute path), size in bytes, and version."""

    path: str
    size: int
    version: str


@dataclass(frozen=True)
class FileSource:
    """A resolved ``data.source``: the exact files, their format, and how to reach them."""

    uri: str
    format: str
    files: tuple[SourceFile, ...]
    options: StorageOptions

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]


def _format_of(path: str) -> str | None:
    lower = path.lower()
    for fmt, exts in EXTENSIONS.items():
        if lower.endswith(exts):
            return fmt
    return None


def resolve(
    uri: str,
    fmt: str | None = None,
    options: StorageOptions | None = None,
    key: str = "data.source",
) -> FileSource:
    """List the files of ``uri`` (a file, a folder, or a glob) with size and version.

    Raises:
        ConfigError: Nothing there, no file of a known format, or mixed formats; the message
            names ``key`` and the fix.
    """
    options = options or StorageOptions()
    norm = storage.normalize(uri)
    fs, path = storage.filesystem(norm, options)
    remote = storage.is_s3(norm)
    prefix = "s3://" if remote else ""

    def listing() -> list[dict[str, Any]]:
        if globlib.has_magic(path):
            found = fs.glob(path, detail=True)
            return [v for v in found.values() if v.get("type") != "directory"]
        if not fs.exists(path):
            return []
        if fs.isdir(path):
            found = fs.find(path, detail=True)
            return [v for v in found.values() if v.get("type") != "directory"]
        return [fs.info(path)]

    try:
        entries = storage._retry(options, listing, f"list {norm}")
    except Exception as exc:  # credentials, unreachable endpoint, missing bucket
        raise ConfigError(
            f"{key}={uri}: cannot list it ({type(exc).__name__}: {exc}). Check the path, and for "
            "s3:// the bucket, storage.endpoint_url/storage.region and the AWS credentials."
        ) from None
    if not entries:
        raise ConfigError(
            f"{key}={uri}: no such file, folder or matching files. Give an existing Parquet or "
            "CSV file, a folder of them, or a glob such as data/*.parquet."
        )
    names = sorted(e["name"] for e in entries)
    by_name = {e["name"]: e for e in entries}
    if fmt is None:
        formats = {f for n in names if (f := _format_of(n))}
        if len(formats) > 1:
            raise ConfigError(
                f"{key}={uri} holds both Parquet and CSV files. Point it at one kind "
                "(a glob such as data/*.parquet), or set data.format."
            )
        if not formats:
            raise ConfigError(
                f"{key}={uri}: none of its {len(names)} file(s) ends in .parquet, .pq or .csv, "
                "so the format is unknown. Set data.format=parquet or data.format=csv."
            )
        fmt = formats.pop()
    single = len(names) == 1 and not globlib.has_magic(path)
    chosen = [n for n in names if single or _format_of(n) == fmt]
    if not chosen:
        raise ConfigError(f"{key}={uri}: no .{fmt} files there. Check data.format.")
    files = []
    for name in chosen:
        info = by_name[name]
        version = info.get("ETag") or info.get("etag")
        version = f"etag:{str(version).strip(chr(34))}" if version else f"mtime:{info.get('mtime')}"
        files.append(SourceFile(f"{prefix}{name}", int(info.get("size") or 0), version))
    if all(f.size == 0 for f in files):
        raise ConfigError(f"{key}={uri}: every file is empty (0 bytes). Point it at real data.")
    return FileSource(norm, fmt, tuple(files), options)


def arrow_filesystem(source: FileSource) -> Any:
    """The pyarrow filesystem for Ray Data and the driver's reads (local, or S3 via s3fs)."""
    import pyarrow.fs

    if source.uri.startswith(("s3://", "s3a://")):
        fs, _ = storage.filesystem(source.uri, source.options)
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    return pyarrow.fs.LocalFileSystem()


def arrow_path(path: str) -> str:
    """A file's path as pyarrow filesystems name it (no scheme)."""
    return path.split("://", 1)[1] if "://" in path else path


def read_batches(
    source: FileSource,
    require: Sequence[str] = (),
    batch_rows: int = SCAN_BATCH_ROWS,
    key: str = "data.source",
) -> Iterator[pd.DataFrame]:
    """Every row of the source once, in file order, as pandas batches of at most ``batch_rows``.

    Raises:
        ConfigError: A file is unreadable (truncated, not Parquet/CSV) or lacks a column in
            ``require``; the message names the file.
    """
    import pyarrow as pa

    fs = arrow_filesystem(source)
    for file in source.files:
        try:
            yield from _file_batches(fs, file.path, source.format, require, batch_rows)
        except ConfigError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ConfigError(
                f"{key}: cannot read {file.path} as {source.format} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300]}). The file may be truncated or not "
                f"{source.format}; replace it, or remove it from {key}."
            ) from None


def _file_batches(
    fs: Any, path: str, fmt: str, require: Sequence[str], batch_rows: int
) -> Iterator[pd.DataFrame]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with fs.open_input_file(arrow_path(path)) as handle:
        if fmt == "parquet":
            reader = pq.ParquetFile(handle)
            names = reader.schema_arrow.names
            _check_columns(path, names, require)
            for batch in reader.iter_batches(batch_size=batch_rows):
                yield batch.to_pandas()
        else:
            reader = pacsv.open_csv(handle)
            names = reader.schema.names
            _check_columns(path, names, require)
            for batch in reader:
                frame = batch.to_pandas()
                for start in range(0, len(frame), batch_rows):
                    yield frame.iloc[start : start + batch_rows].reset_index(drop=True)


def _check_columns(path: str, names: Sequence[str], require: Sequence[str]) -> None:
    from forge.errors import did_you_mean

    for col in require:
        if col not in names:
            raise ConfigError(
                f"{path} has no column {col!r}.{did_you_mean(col, names)} Its columns: "
                f"{', '.join(names[:30])}{' ...' if len(names) > 30 else ''}. Fix data.columns, "
                "data.label or data.split_key."
            )
