"""File output through fsspec that never publishes a half-written file, and storage failures
(missing object, access denied, retries exhausted) as messages that name the URL."""

from __future__ import annotations

import errno
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec

from vermeer_core.errors import VermeerError

__all__ = ["StorageError", "atomic_write_bytes", "atomic_write_text", "disk_full", "disk_full_message", "join",
           "storage_errors"]


class StorageError(VermeerError):
    """Reading or writing ``url`` failed; ``kind`` is "missing", "denied", "failed" or "full" (no space)."""

    def __init__(self, message: str, url: str, kind: str) -> None:
        super().__init__(message)
        self.url = url
        self.kind = kind


_ADVICE = {
    "missing": "check the URL (and that the run or data was written there)",
    "denied": "check the credentials fsspec uses (for gs://: GOOGLE_APPLICATION_CREDENTIALS or "
    "`gcloud auth application-default login`) and that this account may access the bucket",
    "failed": "the storage kept failing after the filesystem's own retries; try again later",
    "full": "free space on that disk (old runs, exported files; a run keeps train.keep_checkpoints checkpoints) "
    "or write to another disk (--out); a run then continues from its last committed checkpoint with --resume auto",
}

_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> OSError | None:
    """The "no space left" / "quota exceeded" error behind ``exc`` (its causes, contexts and
    DCP's per-rank failures included), or None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()
                     if isinstance(f, BaseException) or (isinstance(f, tuple) and f)]
        todo += [e.__cause__, e.__context__]
    return None


def disk_full_message(exc: OSError, url: str | None = None) -> str:
    """What to tell the user when the disk filled up while writing (``url``: where, if known)."""
    where = exc.filename or url
    what = "the quota is exceeded" if exc.errno == errno.EDQUOT else "the disk is full"
    return f"{what} while writing{f' {where}' if where else ''} ({exc.strerror}); {_ADVICE['full']}"


def _root_cause(exc: BaseException) -> BaseException:
    # torch.distributed.checkpoint reports a storage failure as CheckpointException whose
    # ``failures`` maps rank -> (exception, traceback summary)
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) and first else first
    return exc


def _classify(exc: BaseException) -> str | None:
    """"missing", "denied", "failed", or None for errors that are not the storage's."""
    code = getattr(exc, "code", None) if not isinstance(exc, OSError) else None
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return "full"
    if isinstance(exc, FileNotFoundError) or code == 404:
        return "missing"
    # gcsfs raises a plain OSError("Forbidden: ..."); s3fs and local files PermissionError
    if isinstance(exc, PermissionError) or code in (401, 403) or (
        isinstance(exc, OSError) and str(exc).startswith("Forbidden")
    ):
        return "denied"
    if isinstance(exc, OSError) or isinstance(code, int):  # incl. gcsfs HttpError 5xx after retries
        return "failed"
    return None


@contextmanager
def storage_errors(url: str, action: str) -> Iterator[None]:
    """Re-raise a storage failure inside the block as :class:`StorageError`:
    ``cannot <action> <url>: <what> (<detail>); <what to do>``. Other errors pass unchanged."""
    try:
        yield
    except VermeerError:
        raise
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        cause = _root_cause(exc)
        kind = _classify(cause)
        if kind is None:
            raise
        what = {"missing": "not found", "denied": "access denied", "failed": "storage error",
                "full": "no space left"}[kind]
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise StorageError(
            f"cannot {action} {url}: {what} ({type(cause).__name__}: {detail}); {_ADVICE[kind]}", url, kind
        ) from exc


def join(base: str, *parts: str) -> str:
    """Join URL/path parts with '/', keeping a ``scheme://`` prefix intact."""
    return posixpath.join(base.rstrip("/"), *parts) if base else posixpath.join(*parts)


LOCAL_PROTOCOLS = ("file", "local")


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk (rename is atomic, append works)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in LOCAL_PROTOCOLS for p in protocols)


def is_local_url(url: str) -> bool:
    protocol = fsspec.core.split_protocol(url)[0]
    return protocol is None or protocol in LOCAL_PROTOCOLS


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``url``, then move it into place.

    On local disks the move is an atomic rename. Object stores (gs://) have no rename; there a
    single-object upload is itself all-or-nothing, so the data is written directly.
    """
    with storage_errors(url, "write"):
        _write(url, data)


def _write(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local_fs(fs):
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
