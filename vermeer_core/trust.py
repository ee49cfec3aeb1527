"""Reading checkpoints as data, not code: DCP metadata through a restricted unpickler, and
file digests that the commit marker records and loading verifies.

DCP stores a checkpoint's index (``.metadata``) as a pickle and loads it with a plain
``pickle.load`` (torch 2.13, ``FileSystemReader.read_metadata``): a crafted file runs any
code on whoever loads the checkpoint. People share run directories and ``gs://`` buckets, so
:class:`SafeReader` (the only reader vermeer hands DCP) admits just the types DCP itself
writes there. Tensor payloads are read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from collections import OrderedDict
from typing import Any

import fsspec
import torch
from torch.distributed.checkpoint import filesystem as _dcp_fs
from torch.distributed.checkpoint import metadata as _dcp_md
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from vermeer_core.errors import VermeerError

__all__ = [
    "ALGORITHM",
    "CheckpointError",
    "SafeReader",
    "UnsafeCheckpointError",
    "file_digest",
    "load_metadata",
    "read_metadata_url",
]

#: Digest of checkpoint files in the commit marker (hashlib name; sha256 runs on SHA-NI where the CPU has it).
ALGORITHM = "sha256"
_CHUNK = 8 << 20


class CheckpointError(VermeerError):
    """A checkpoint cannot be used: damaged, incomplete, or not what it claims to be."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's metadata asked to run code (a pickle naming a non-DCP global)."""


# Exactly what torch 2.13's DCP pickles into ``.metadata`` (found by recording find_class on
# real checkpoints): its metadata dataclasses, the per-file storage info, torch.Size, and
# dtype/layout/memory-format singletons.
_ALLOWED: dict[tuple[str, str], Any] = {
    (_dcp_md.__name__, name): getattr(_dcp_md, name)
    for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    )
    if hasattr(_dcp_md, name)
}
_ALLOWED[(_dcp_fs.__name__, "_StorageInfo")] = _dcp_fs._StorageInfo
_ALLOWED[("torch", "Size")] = torch.Size
_ALLOWED[("collections", "OrderedDict")] = OrderedDict
# torch pickles a layout as a call of this lookup on its name (a dict lookup, no side effects)
_ALLOWED[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
_TORCH_SINGLETONS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals in :data:`_ALLOWED` (and torch dtype/layout/memory-format
    attributes): every other global, which is how a pickle reaches code, is refused."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" and name.isidentifier():
            value = getattr(torch, name, None)
            if isinstance(value, _TORCH_SINGLETONS):
                return value
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which DCP checkpoint metadata never contains")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("holds a persistent reference, which DCP checkpoint metadata never contains")


def load_metadata(data: bytes, where: str) -> Metadata:
    """DCP :class:`Metadata` from the bytes of a ``.metadata`` file, executing nothing.
    Raises :class:`UnsafeCheckpointError` for a pickle that names other globals and
    :class:`CheckpointError` for one that is damaged or of another type."""
    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        if "DCP checkpoint metadata never contains" in str(exc):
            raise UnsafeCheckpointError(
                f"{where} {exc}: refused to load it (it would run code; a crafted or foreign file?). "
                "Use checkpoints only from runs you trust, or delete this checkpoint", where
            ) from None
        raise CheckpointError(f"{where} is damaged (not a readable DCP metadata pickle: {exc})", where) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError) as exc:
        raise CheckpointError(
            f"{where} is damaged (not a readable DCP metadata pickle: {type(exc).__name__}: {exc})", where
        ) from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{where} does not hold DCP checkpoint metadata (found {type(md).__name__})", where)
    return md


def read_metadata_url(url: str) -> Metadata:
    """:func:`load_metadata` of the ``.metadata`` file of the checkpoint at ``url``."""
    from vermeer_core.io import join, storage_errors

    path = join(url, ".metadata")
    with storage_errors(path, "read"), fsspec.open(path, "rb") as f:
        data = f.read()
    return load_metadata(data, path)


class SafeReader(FsspecReader):
    """torch's fsspec DCP reader with ``read_metadata`` replaced by :func:`load_metadata`
    (the rest, tensor reads with ``weights_only=True``, is torch's). DCP folds a failure here
    into an AssertionError of its own; ``failure`` keeps ours for the message."""

    failure: CheckpointError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        try:
            md = load_metadata(data, str(path))
        except CheckpointError as exc:
            if self.failure is None:
                self.failure = exc
            raise
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id  # as torch's read_metadata does
        return md


def file_digest(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str]:
    """(size, hex digest) of a file, streamed in 8 MiB chunks."""
    h = hashlib.new(ALGORITHM)
    size = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def marker_text(step: int, files: dict[str, tuple[int, str]]) -> str:
    """The commit marker: the step and (size, digest) of every file of the checkpoint."""
    return json.dumps(
        {"step": step, "algorithm": ALGORITHM,
         "files": {k: {"size": s, "digest": d} for k, (s, d) in sorted(files.items())}},
        indent=1,
    ) + "\n"


def parse_marker(text: str, where: str) -> dict[str, tuple[int, str]] | None:
    """Files recorded in a marker, or None for a marker of an older vermeer (just the step:
    nothing to verify against). Raises :class:`CheckpointError` for a damaged marker."""
    stripped = text.strip()
    if stripped.isdigit():
        return None
    try:
        data = json.loads(stripped)
        if data["algorithm"] != ALGORITHM:
            raise ValueError(f"digest algorithm {data['algorithm']!r} (this vermeer uses {ALGORITHM})")
        return {str(k): (int(v["size"]), str(v["digest"])) for k, v in data["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where} is damaged ({type(exc).__name__}: {exc})", where) from None
