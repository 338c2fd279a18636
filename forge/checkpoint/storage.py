"""Storage paths are ``str`` URIs handled by fsspec; local paths become absolute paths.

This is the only module that turns a URI into a filesystem, so remote-storage concerns
(credentials, endpoints, retries) have one home.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file://``."""
    return "://" in uri and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Absolute local path for local paths and ``file://`` URIs; other URIs unchanged.

    Example:
        >>> normalize("memory://bucket/run/")
        'memory://bucket/run'
    """
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/'.

    Example:
        >>> join("s3://bucket/runs", "exp1", "checkpoints")
        's3://bucket/runs/exp1/checkpoints'
    """
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it."""
    return url_to_fs(uri)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def list_dir(uri: str) -> list[dict[str, Any]]:
    """Entries directly under ``uri`` (name = last path part, type, size); [] when missing."""
    fs, path = filesystem(uri)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return [{**e, "name": e["name"].rstrip("/").rsplit("/", 1)[-1]} for e in entries]


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
