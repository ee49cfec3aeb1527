"""One writer per run directory: a lease file that rank 0 of a run creates, renews and removes.

Two runs writing one ``--out`` delete each other's in-progress checkpoints as crash debris and
interleave their metrics, so ``<run>/lease.json`` (holder host, pid, start time, last renewal,
a random token) is created atomically, never overwritten blindly:

* local disks: ``O_CREAT | O_EXCL``; takeover, renewal and release run under ``flock`` of
  the run directory itself and re-read the file first, so two contenders cannot both win;
* ``gs://``: object writes with a generation precondition (``ifGenerationMatch=0`` to create,
  ``=<generation read>`` to take over or renew), so the store itself arbitrates;
* other fsspec filesystems (memory://, ...): the same protocol without atomicity (best effort).

A heartbeat thread renews the lease every ``ttl/4`` seconds. A lease not renewed for ``ttl``
seconds (``VERMEER_LEASE_TTL``, default 120), or whose process is gone (same host), is stale
and the next run takes it over, saying whose it was. A holder that finds its lease taken
(e.g. it was suspended longer than ``ttl``) reports it through :meth:`Lease.check`, which the
engine calls before every checkpoint, and stops without writing.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import fsspec

from vermeer_core.errors import VermeerError
from vermeer_core.io import is_local_fs, join, storage_errors

__all__ = ["Lease", "LeaseError", "LeaseHeld", "LeaseLost", "Holder", "LEASE_FILE", "default_ttl"]

LEASE_FILE = "lease.json"


class LeaseError(VermeerError):
    """The run directory's lease cannot be had or was lost."""


class LeaseHeld(LeaseError):
    """Another live run holds the lease (the CLI exits 1 with this message)."""


class LeaseLost(LeaseError):
    """This run's lease was taken over by another run."""


def default_ttl() -> float:
    """Seconds without renewal after which a lease is stale (``VERMEER_LEASE_TTL``, default 120)."""
    raw = os.environ.get("VERMEER_LEASE_TTL", "120")
    try:
        ttl = float(raw)
    except ValueError:
        raise LeaseError(f"VERMEER_LEASE_TTL must be a number of seconds, got {raw!r}") from None
    if ttl <= 0:
        raise LeaseError(f"VERMEER_LEASE_TTL must be > 0, got {raw!r}")
    return ttl


@dataclass
class Holder:
    host: str
    pid: int
    started: float
    renewed: float
    token: str

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder recorded in a lease file, or None when it is unreadable (torn, foreign)."""
        try:
            d = json.loads(data)
            return cls(str(d["host"]), int(d["pid"]), float(d["started"]), float(d["renewed"]), str(d["token"]))
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> bytes:
        return (json.dumps(asdict(self), indent=1) + "\n").encode()

    def describe(self) -> str:
        started = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"host {self.host}, pid {self.pid}, started {started}, renewed {time.time() - self.renewed:.0f} s ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a killed child its parent has not reaped yet still answers kill(0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def stale_reason(holder: Holder | None, ttl: float, host: str) -> str | None:
    """Why a recorded lease may be taken over, or None while it is live."""
    if holder is None:
        return "the lease file is unreadable"
    age = time.time() - holder.renewed
    if age > ttl:
        return f"not renewed for {age:.0f} s (> {ttl:g} s)"
    if holder.host == host:
        if holder.pid == os.getpid():
            return "left by this process"
        if not _pid_alive(holder.pid):
            return f"process {holder.pid} is gone"
    return None


class _Backend:
    """Conditional operations on the lease object. ``version`` is opaque: what :meth:`read`
    saw, passed back to :meth:`replace`/:meth:`delete` so they fail if it changed."""

    def create(self, data: bytes) -> Any: ...  # version, or raise FileExistsError
    def read(self) -> tuple[bytes, Any] | None: ...  # (data, version) or None when absent
    def replace(self, data: bytes, version: Any) -> Any: ...  # new version, or raise FileExistsError
    def delete(self, version: Any) -> None: ...

    @contextmanager
    def guard(self) -> Iterator[None]:
        yield


class _LocalBackend(_Backend):
    def __init__(self, path: str) -> None:
        self.path = path

    def create(self, data: bytes) -> Any:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return data

    def read(self) -> tuple[bytes, Any] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, data: bytes, version: Any) -> Any:
        # callers hold guard(): nobody else changes the file between their read and this
        current = self.read()
        if current is None or current[1] != version:
            raise FileExistsError(self.path)
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return data

    def delete(self, version: Any) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            os.unlink(self.path)

    @contextmanager
    def guard(self) -> Iterator[None]:
        import fcntl

        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)  # flock works on a directory: no lock file to leave behind
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


class _GCSBackend(_Backend):
    """gcsfs: uploads and deletes with ``ifGenerationMatch`` (GCS's compare-and-swap)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.bucket, self.key = path.split("/", 1)

    def _upload(self, data: bytes, generation: str) -> str:
        """One multipart upload (metadata + body, as gcsfs's own small-file upload) with the
        ``ifGenerationMatch`` precondition; gcsfs raises FileExistsError on 412."""
        from urllib.parse import quote

        head = json.dumps({"name": self.key, "contentType": "application/json"})
        body = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{head}\n--==0==\n"
                "Content-Type: application/json\n\n").encode() + data + b"\n--==0==--"
        out = self.fs.call(
            "POST", f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o",
            uploadType="multipart", ifGenerationMatch=generation,
            headers={"Content-Type": 'multipart/related; boundary="==0=="'}, data=body, json_out=True,
        )
        return str(out["generation"])

    def create(self, data: bytes) -> Any:
        return self._upload(data, "0")

    def read(self) -> tuple[bytes, Any] | None:
        try:
            headers, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
        except FileNotFoundError:
            return None
        generation = headers.get("x-goog-generation")
        if generation is None:  # not every server sends it: ask for the object's metadata
            info = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
            generation = info["generation"]
        return data, str(generation)

    def replace(self, data: bytes, version: Any) -> Any:
        return self._upload(data, str(version))

    def delete(self, version: Any) -> None:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=str(version))
        except (FileNotFoundError, FileExistsError):
            pass  # already gone, or no longer ours


class _FsspecBackend(_Backend):
    """Any other fsspec filesystem: same protocol, not atomic (no conditional writes)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path

    def create(self, data: bytes) -> Any:
        if self.fs.exists(self.path):
            raise FileExistsError(self.path)
        self.fs.pipe_file(self.path, data)
        return data

    def read(self) -> tuple[bytes, Any] | None:
        if not self.fs.exists(self.path):
            return None
        data = self.fs.cat_file(self.path)
        return data, data

    def replace(self, data: bytes, version: Any) -> Any:
        current = self.read()
        if current is None or current[1] != version:
            raise FileExistsError(self.path)
        self.fs.pipe_file(self.path, data)
        return data

    def delete(self, version: Any) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            self.fs.rm_file(self.path)


def _backend(url: str) -> _Backend:
    fs, path = fsspec.core.url_to_fs(url)
    if is_local_fs(fs):
        return _LocalBackend(os.path.abspath(path))
    if type(fs).__module__.startswith("gcsfs"):
        return _GCSBackend(fs, path)
    return _FsspecBackend(fs, path)


class Lease:
    """The lease of run directory ``run_url``: :meth:`acquire` (or ``with``), then renewed by
    a daemon thread until :meth:`release`. ``say`` reports a takeover."""

    def __init__(self, run_url: str, *, ttl: float | None = None, say: Callable[[str], None] = print) -> None:
        self.url = join(run_url, LEASE_FILE)
        self.ttl = ttl if ttl is not None else default_ttl()
        self.say = say
        self.host = socket.gethostname()
        self._backend = _backend(self.url)
        self._me: Holder | None = None
        self._version: Any = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    # --- acquire / release ----------------------------------------------------------------
    def acquire(self) -> None:
        now = time.time()
        me = Holder(self.host, os.getpid(), now, now, uuid.uuid4().hex)
        with storage_errors(self.url, "take the run lease"):
            self._version = self._take(me)
        self._me = me
        self._thread = threading.Thread(target=self._heartbeat, name="vermeer-lease", daemon=True)
        self._thread.start()

    def _take(self, me: Holder) -> Any:
        b = self._backend
        try:
            return b.create(me.dump())
        except FileExistsError:
            pass
        with b.guard():
            current = b.read()
            if current is None:  # released meanwhile
                try:
                    return b.create(me.dump())
                except FileExistsError:  # and taken by another run at once
                    again = b.read()
                    raise LeaseHeld(self._held_message(Holder.parse(again[0]) if again else None)) from None
            data, version = current
            holder = Holder.parse(data)
            if holder is not None and holder.token == me.token:
                return version  # our own create, retried by the client after a lost reply
            why = stale_reason(holder, self.ttl, self.host)
            if why is None:
                raise LeaseHeld(self._held_message(holder))
            try:
                new = b.replace(me.dump(), version)
            except FileExistsError:  # another run took it over first
                again = b.read()
                other = Holder.parse(again[0]) if again else None
                raise LeaseHeld(self._held_message(other)) from None
            who = holder.describe() if holder else "unknown holder"
            self.say(f"took over the stale lease of {self.url} ({who}): {why}")
            return new

    def _held_message(self, holder: Holder | None) -> str:
        who = holder.describe() if holder else "a run whose lease was just renewed"
        return (
            f"another run is writing this run directory: {self.url} is held by {who}. Wait for it to "
            f"finish or stop it, or use another --out; a lease not renewed for {self.ttl:g} s "
            "(VERMEER_LEASE_TTL), or whose process is gone on the same host, is taken over automatically"
        )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl)
            self._thread = None
        if self._me is None or self._lost is not None:
            return
        with self._mutex, storage_errors(self.url, "release the run lease"), self._backend.guard():
            current = self._backend.read()
            if current is not None and current[1] == self._version:
                self._backend.delete(self._version)
        self._me = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # --- renewal -----------------------------------------------------------------------------
    def renew(self) -> None:
        """Record a renewal now; notes a lost lease (see :meth:`check`) instead of raising."""
        if self._me is None or self._lost is not None:
            return
        with self._mutex, self._backend.guard():
            me = Holder(**{**asdict(self._me), "renewed": time.time()})
            try:
                self._version = self._backend.replace(me.dump(), self._version)
                self._me = me
            except FileExistsError:
                current = self._backend.read()
                other = Holder.parse(current[0]) if current else None
                if other is not None and other.token == me.token:  # our write landed, its reply was lost
                    self._version, self._me = current[1], other  # type: ignore[index]
                    return
                self._lost = other.describe() if other else "nobody (the lease file was removed)"

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except Exception:  # a transient storage error: retried at the next beat
                pass
            if self._lost is not None:
                return

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another run has taken this lease over."""
        if self._lost is not None:
            raise LeaseLost(
                f"this run lost its lease {self.url} to {self._lost} (was this process suspended for more than "
                f"{self.ttl:g} s?); stopping without writing more, so the other run's files stay intact"
            )
