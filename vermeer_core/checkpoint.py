"""Checkpoints: torch.distributed.checkpoint (DCP) over fsspec, committed by a marker file.

Layout under ``<run>/checkpoints/``::

    step-00000120/      DCP shards + .metadata, meta.json (rank 0), rank-00000.json (per rank)
    step-00000120/COMMITTED   written last, by rank 0, after every rank finished writing
    latest              name of the newest committed checkpoint (a hint; it moves only after
                        the marker exists, and readers verify the marker anyway)

A directory without ``COMMITTED`` is debris from a crash and is never loaded; it is removed
by the next successful save. The last ``keep`` committed checkpoints are retained (and any
whose step is ``pinned``: the engine pins stage ends with ``train.keep_stage_ends``); pruning
deletes a checkpoint's marker before its files, so a half-pruned one is debris too.

``COMMITTED`` records the size and digest (:data:`vermeer_core.trust.ALGORITHM`) of every
file of the checkpoint; :meth:`Checkpointer.inspect` checks them (digests optional: sizes
catch truncation cheaply) and reads ``.metadata`` with the restricted unpickler. A checkpoint
that resume rejects gets ``REJECTED`` (the reason) in place of its marker.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

# FsspecWriter/Reader are torch's own fsspec storage layer for DCP (private module path, public
# behaviour; used by torchtitan too). They work for local paths, memory:// and gs:// (gcsfs).
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from vermeer_core.errors import VermeerError
from vermeer_core.io import StorageError, atomic_write_text, join, storage_errors
from vermeer_core.trust import (
    CheckpointError, SafeReader, file_digest, marker_text, parse_marker, read_metadata_url,
)

__all__ = ["Checkpointer", "CheckpointError", "MARKER", "REJECTED", "META_KEYS", "step_dir_name"]

MARKER = "COMMITTED"
REJECTED = "REJECTED"
#: meta.json entries the engine writes and resume relies on (``Checkpointer(meta_keys=...)``)
META_KEYS = ("step", "stage", "phase", "phase_name", "step_in_phase", "spec", "world_size", "optim_names")
_STEP_RE = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fault(point: str, step: int) -> None:
    """Test-only fault injection: ``VERMEER_FAULT=<point>:<step>`` SIGKILLs this process at
    ``point`` of the checkpoint save at ``step`` (points: before-shards, before-marker,
    after-marker). Lets tests prove that a kill at any moment loses nothing committed."""
    spec = os.environ.get("VERMEER_FAULT", "")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class Checkpointer:
    def __init__(
        self, run_url: str, *, keep: int = 2, rank: int = 0, world_size: int = 1, meta_keys: tuple[str, ...] = (),
        pinned: frozenset[int] = frozenset(),
    ) -> None:
        self.root = join(run_url, "checkpoints")
        self.meta_keys = meta_keys  # meta.json entries a checkpoint must have to be usable
        self.keep = keep
        self.pinned = pinned  # steps whose committed checkpoints pruning keeps besides the newest `keep`
        self.rank = rank
        self.world_size = world_size
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)

    # --- discovery -------------------------------------------------------------------------
    def _list_steps(self) -> list[tuple[int, str]]:
        self.fs.invalidate_cache(self._root_path)  # gcsfs caches listings; another run may have written
        if not self.fs.exists(self._root_path):
            return []
        out = []
        for entry in self.fs.ls(self._root_path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            m = _STEP_RE.match(name)
            if m:
                out.append((int(m.group(1)), name))
        return sorted(out)

    def _committed(self, name: str) -> bool:
        path = f"{self._root_path}/{name}/{MARKER}"
        self.fs.invalidate_cache(f"{self._root_path}/{name}")
        return self.fs.exists(path)

    def committed(self) -> list[str]:
        """URLs of committed checkpoints, oldest first."""
        with storage_errors(self.root, "list checkpoints in"):
            return [join(self.root, name) for _, name in self._list_steps() if self._committed(name)]

    def latest(self) -> str | None:
        """URL of the newest committed checkpoint, or None."""
        done = self.committed()
        return done[-1] if done else None

    # --- save --------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any], rank_state: dict[str, Any]) -> str:
        """Collective: every rank calls it. ``state`` goes through DCP (sharded tensors),
        ``meta`` is written by rank 0, ``rank_state`` by each rank. Returns the URL."""
        name = step_dir_name(step)
        url = join(self.root, name)
        path = f"{self._root_path}/{name}"
        if self.rank == 0:
            with storage_errors(url, "remove the uncommitted checkpoint"):
                if self.fs.exists(path):
                    # debris of an earlier, killed attempt, or a checkpoint rejected on resume;
                    # never leave a marker beside partly deleted files
                    self._uncommit(name)
                    self.fs.rm(path, recursive=True)
        if self.world_size > 1:
            dist.barrier()
        _fault("before-shards", step)
        with storage_errors(url, "write checkpoint"):
            dcp.save(state, storage_writer=FsspecWriter(url, single_file_per_rank=True))
        atomic_write_text(join(url, f"rank-{self.rank:05d}.json"), json.dumps(rank_state))
        if self.rank == 0:
            atomic_write_text(join(url, "meta.json"), json.dumps(meta, indent=1))
        if self.world_size > 1:
            dist.barrier()  # every rank's shards and files exist before the marker
        files = self._digest_files(name)
        _fault("before-marker", step)
        if self.rank == 0:
            atomic_write_text(join(url, MARKER), marker_text(step, files))
            _fault("after-marker", step)
            atomic_write_text(join(self.root, "latest"), name + "\n")
            self._prune(step)
        if self.world_size > 1:
            dist.barrier()
        return url

    def _prune(self, newest: int) -> None:
        with storage_errors(self.root, "remove old checkpoints in"):
            self._remove_old(newest)

    def _remove_old(self, newest: int) -> None:
        steps = self._list_steps()
        committed = [(s, n) for s, n in steps if self._committed(n)]
        keep = {n for _, n in committed[-self.keep :]} | {n for s, n in committed if s in self.pinned}
        for s, n in steps:
            if n not in keep and s != newest:  # older committed ones and crash debris
                self._uncommit(n)  # a kill from here on leaves debris, not a committed-looking shell
                _fault("mid-prune", newest)
                self.fs.rm(f"{self._root_path}/{n}", recursive=True)

    def reject(self, url: str, reason: str) -> None:
        """Rank 0: take a checkpoint that failed :meth:`inspect` out of the committed set:
        ``REJECTED`` (the reason) is written, then the marker removed; the next save prunes it."""
        atomic_write_text(join(url, REJECTED), reason + "\n")
        with storage_errors(url, "remove the commit marker of"):
            self._uncommit(url.rstrip("/").rsplit("/", 1)[-1])

    def write_latest(self) -> None:
        """Rank 0: point ``latest`` at the newest committed checkpoint (repairs a stale hint)."""
        url = self.latest()
        if url is not None:
            atomic_write_text(join(self.root, "latest"), url.rstrip("/").rsplit("/", 1)[-1] + "\n")

    def _uncommit(self, name: str) -> None:
        marker = f"{self._root_path}/{name}/{MARKER}"
        if self.fs.exists(marker):
            self.fs.rm(marker)

    # --- integrity ---------------------------------------------------------------------------
    def _files(self, name: str) -> dict[str, int]:
        return _files_at(self.fs, f"{self._root_path}/{name}")

    def _share(self, names: list[str]) -> list[str]:
        """This rank's share of ``names`` (sorted, every world_size-th): ranks digest in parallel."""
        return sorted(names)[self.rank :: self.world_size]

    def _digest_files(self, name: str) -> dict[str, tuple[int, str]]:
        """Collective: (size, digest) of every file of checkpoint ``name``, complete on rank 0."""
        with storage_errors(join(self.root, name), "digest checkpoint files of"):
            mine = {f: file_digest(self.fs, f"{self._root_path}/{name}/{f}") for f in self._share(list(self._files(name)))}
        if self.world_size > 1:
            parts: list[Any] = [None] * self.world_size
            dist.all_gather_object(parts, mine)
            mine = {k: v for part in parts for k, v in part.items()}
        return mine

    def inspect(self, url: str, *, digests: bool = True) -> str | None:
        """Why the committed checkpoint at ``url`` cannot be used, or None when it can: the
        files its marker records exist with their sizes (and digests, when ``digests``), and
        ``.metadata``, ``meta.json`` and the rank files read as data. Collective when
        world_size > 1 (each rank digests a share; all get the same verdict)."""
        try:
            self._inspect(url, digests)
            reason = None
        except CheckpointError as exc:
            reason = str(exc)
        except StorageError as exc:
            if exc.kind != "missing":
                raise  # access denied / storage down: not the checkpoint's fault, no fallback
            reason = str(exc)
        if self.world_size > 1:
            reasons: list[Any] = [None] * self.world_size
            dist.all_gather_object(reasons, reason)
            reason = next((r for r in reasons if r), None)
        return reason

    def _inspect(self, url: str, digests: bool) -> None:
        fs, base = fsspec.core.url_to_fs(url)
        base = base.rstrip("/")
        with storage_errors(url, "inspect checkpoint"):
            with fs.open(f"{base}/{MARKER}", "rb") as f:
                raw = f.read()
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                raise CheckpointError(f"{join(url, MARKER)} is damaged (not text)", url) from None
            recorded = parse_marker(text, join(url, MARKER))
            present = _files_at(fs, base)
            if recorded is not None:
                for f, (size, _) in sorted(recorded.items()):
                    if f not in present:
                        raise CheckpointError(f"{join(url, f)} is missing (recorded in {MARKER})", url)
                    if present[f] != size:
                        raise CheckpointError(
                            f"{join(url, f)} has {present[f]} bytes, {MARKER} records {size} (truncated or "
                            "overwritten)", url)
                if digests:
                    for f in self._share(list(recorded)):
                        if file_digest(fs, f"{base}/{f}")[1] != recorded[f][1]:
                            raise CheckpointError(
                                f"{join(url, f)} does not match its digest in {MARKER} (corrupted)", url)
            for f in (".metadata", "meta.json"):
                if f not in present:
                    raise CheckpointError(f"{join(url, f)} is missing", url)
            read_metadata_url(url)
            self.read_meta(url)
            for f in present:
                if f.startswith("rank-") and f.endswith(".json") and f[5:-5].isdigit():
                    self.read_rank_state(url, int(f[5:-5]))

    # --- load --------------------------------------------------------------------------------
    def read_meta(self, url: str) -> dict[str, Any]:
        """meta.json, checked to be a JSON object with ``meta_keys`` (else CheckpointError)."""
        u = join(url, "meta.json")
        with storage_errors(u, "read"), fsspec.open(u, "rb") as f:
            meta = _json(f.read(), u)
        if not isinstance(meta, dict):
            raise CheckpointError(f"{u} is damaged (not a JSON object)", url)
        missing = [k for k in self.meta_keys if k not in meta]
        if missing:
            raise CheckpointError(f"{u} is damaged (missing {', '.join(missing)})", url)
        return meta

    def read_rank_state(self, url: str, rank: int) -> dict[str, Any] | None:
        u = join(url, f"rank-{rank:05d}.json")
        fs, p = fsspec.core.url_to_fs(u)
        with storage_errors(u, "read"):
            if not fs.exists(p):
                return None
            with fs.open(p, "rb") as f:
                state = _json(f.read(), u)
        if not isinstance(state, dict) or "data" not in state:
            raise CheckpointError(f"{u} is damaged (no data position)", url)
        return state

    def load(self, url: str, state: dict[str, Any]) -> None:
        """Collective: fill ``state`` (same structure as saved, possibly another sharding) in place."""
        reader = SafeReader(url)
        with dcp_errors(url, reader):
            dcp.load(state, storage_reader=reader)


def _files_at(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, int]:
    """{file name: size} of a checkpoint directory, marker and rejection note excluded."""
    fs.invalidate_cache(path)  # gcsfs caches listings
    out = {}
    for info in fs.ls(path, detail=True):
        base = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "file" and base not in (MARKER, REJECTED) and not base.endswith(".tmp"):
            out[base] = int(info["size"])
    return out


def _json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:  # incl. UnicodeDecodeError
        raise CheckpointError(f"{where} is damaged (not JSON: {exc})", where) from None


@contextmanager
def dcp_errors(url: str, reader: SafeReader | None = None) -> Iterator[None]:
    """DCP loads as messages: a storage failure as :class:`~vermeer_core.io.StorageError`, our
    own errors (e.g. unsafe metadata) as they are, anything else DCP raises while reading (a
    truncated shard, a size mismatch) as :class:`CheckpointError` naming ``url``."""
    try:
        with storage_errors(url, "read checkpoint"):
            yield
    except (VermeerError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        if reader is not None and reader.failure is not None:
            raise reader.failure from None
        failures = getattr(exc, "failures", None)
        cause = next(iter(failures.values())) if isinstance(failures, dict) and failures else exc
        cause = cause[0] if isinstance(cause, tuple) and cause else cause
        if isinstance(cause, VermeerError):
            raise cause from None
        detail = (str(cause).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"cannot read checkpoint {url}: {type(cause).__name__}: {detail}; it is damaged (keep "
            "train.verify_checkpoints on to catch this before loading) or was written for another model", url
        ) from exc
