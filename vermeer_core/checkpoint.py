"""Checkpoints: torch.distributed.checkpoint (DCP) over fsspec, committed by a marker file.

Layout under ``<run>/checkpoints/``::

    step-00000120/      DCP shards + .metadata, meta.json (rank 0), rank-00000.json (per rank)
    step-00000120/COMMITTED   written last, by rank 0, after every rank finished writing
    latest              name of the newest committed checkpoint (a hint; it moves only after
                        the marker exists, and readers verify the marker anyway)

A directory without ``COMMITTED`` is debris from a crash and is never loaded; it is removed
by the next successful save. The last ``keep`` committed checkpoints are retained.
"""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Any

import fsspec
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

# FsspecWriter/Reader are torch's own fsspec storage layer for DCP (private module path, public
# behaviour; used by torchtitan too). They work for local paths, memory:// and gs:// (gcsfs).
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from vermeer_core.io import atomic_write_text, join, storage_errors

__all__ = ["Checkpointer", "MARKER", "step_dir_name"]

MARKER = "COMMITTED"
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
    def __init__(self, run_url: str, *, keep: int = 2, rank: int = 0, world_size: int = 1) -> None:
        self.root = join(run_url, "checkpoints")
        self.keep = keep
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
                    self.fs.rm(path, recursive=True)  # uncommitted debris of an earlier, killed attempt
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
        _fault("before-marker", step)
        if self.rank == 0:
            atomic_write_text(join(url, MARKER), f"{step}\n")
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
        keep = {n for _, n in committed[-self.keep :]}
        for s, n in steps:
            if n not in keep and s != newest:  # older committed ones and crash debris
                self.fs.rm(f"{self._root_path}/{n}", recursive=True)

    # --- load --------------------------------------------------------------------------------
    def read_meta(self, url: str) -> dict[str, Any]:
        u = join(url, "meta.json")
        with storage_errors(u, "read"), fsspec.open(u, "r") as f:
            return json.load(f)

    def read_rank_state(self, url: str, rank: int) -> dict[str, Any] | None:
        u = join(url, f"rank-{rank:05d}.json")
        fs, p = fsspec.core.url_to_fs(u)
        with storage_errors(u, "read"):
            if not fs.exists(p):
                return None
            with fs.open(p, "r") as f:
                return json.load(f)

    def load(self, url: str, state: dict[str, Any]) -> None:
        """Collective: fill ``state`` (same structure as saved, possibly another sharding) in place."""
        with storage_errors(url, "read checkpoint"):
            dcp.load(state, storage_reader=FsspecReader(url))
