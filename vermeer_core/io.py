"""File output through fsspec that never publishes a half-written file."""

from __future__ import annotations

import posixpath
import uuid

import fsspec

__all__ = ["atomic_write_bytes", "atomic_write_text", "join"]


def join(base: str, *parts: str) -> str:
    """Join URL/path parts with '/', keeping a ``scheme://`` prefix intact."""
    return posixpath.join(base.rstrip("/"), *parts) if base else posixpath.join(*parts)


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``url``, then move it into place.

    On local disks the move is an atomic rename. Object stores (gs://) have no rename; there a
    single-object upload is itself all-or-nothing, so the data is written directly.
    """
    fs, path = fsspec.core.url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def atomic_write_text(url: str, text: str) -> None:
    atomic_write_bytes(url, text.encode())
