"""Loading trained weights for inference: from a DCP checkpoint or an exported safetensors file."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from typing import Any

import fsspec
import torch.distributed.checkpoint as dcp

from vermeer_core.checkpoint import MARKER, Checkpointer, dcp_errors
from vermeer_core.errors import VermeerError
from vermeer_core.io import atomic_write_bytes, join
from vermeer_core.model import VermeerModel, replay
from vermeer_core.registry import Registry
from vermeer_core.spec import RunSpec, parse_spec
from vermeer_core.trust import SafeReader

__all__ = ["InferenceError", "resolve_checkpoint", "load_checkpoint", "load_model", "export_safetensors"]


class InferenceError(VermeerError):
    """A checkpoint or weights file cannot be used; the message says which and why."""


#: meta.json entries inference reads
_META_KEYS = ("spec", "stage")
#: checkpoints this process has inspected and found usable (``vermeer eval`` resolves twice)
_USABLE: set[tuple[str, bool]] = set()


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _usable(url: str, verify: bool) -> str | None:
    """Why the committed checkpoint at ``url`` cannot be used (see Checkpointer.inspect), or None."""
    if (url, verify) in _USABLE:
        return None
    reason = Checkpointer(url, meta_keys=_META_KEYS).inspect(url, digests=verify)
    if reason is None:
        _USABLE.add((url, verify))
    return reason


def resolve_checkpoint(url: str, *, verify: bool = True, say: Callable[[str], None] = _stderr) -> str:
    """A committed, intact checkpoint URL from a checkpoint dir, or from a run dir (its newest
    usable checkpoint: damaged newer ones are skipped, saying why). ``verify`` checks file
    digests; sizes, metadata and meta.json are checked always. Nothing is modified."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise InferenceError(f"no such checkpoint or run directory: {url}")
    if fs.exists(f"{path.rstrip('/')}/{MARKER}"):
        reason = _usable(url, verify)
        if reason is not None:
            raise InferenceError(f"checkpoint {url} cannot be used: {reason}")
        return url
    if fs.exists(f"{path.rstrip('/')}/meta.json"):
        raise InferenceError(f"{url} is an uncommitted (incomplete) checkpoint; use a committed one")
    done = Checkpointer(url).committed()
    if not done:
        raise InferenceError(f"{url} holds no committed checkpoint (looked in {join(url, 'checkpoints')})")
    rejected = []
    for ckpt in reversed(done):
        reason = _usable(ckpt, verify)
        if reason is None:
            return ckpt
        say(f"skipping checkpoint {ckpt}: {reason}")
        rejected.append(f"{ckpt}: {reason}")
    raise InferenceError(f"{url} holds no usable checkpoint:\n  " + "\n  ".join(rejected))


def _load_here(state: dict[str, Any], url: str) -> None:
    """DCP load of full tensors by this process alone (no collective, with or without a
    process group); DCP's warning that it assumes a single process is expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        reader = SafeReader(url)
        with dcp_errors(url, reader):
            dcp.load(state, storage_reader=reader, no_dist=True)


def load_checkpoint(
    url: str, registry: Registry, *, weights: str = "ema", verify: bool = True
) -> tuple[RunSpec, VermeerModel, int]:
    """(spec, model with ``weights`` = "ema" or "model" loaded, stage) from a DCP checkpoint,
    in this process (no process group needed), whatever world size wrote it."""
    url = resolve_checkpoint(url, verify=verify)
    meta = Checkpointer(url, meta_keys=_META_KEYS).read_meta(url)
    spec = parse_spec(meta["spec"], registry, source=join(url, "meta.json"))
    model = replay(spec, registry, meta["stage"])
    state = {weights: {k: v for k, v in model.state_dict().items()}}
    if weights == "model":
        _load_here(state, url)
    else:
        # the EMA holds trainable parameters only; buffers and never-trained (frozen
        # pretrained) weights come from the model entry
        params = {n for n, _ in model.named_parameters() if n not in model.always_frozen}
        state = {"ema": {k: v for k, v in state["ema"].items() if k in params},
                 "model": {k: v for k, v in model.state_dict().items() if k not in params}}
        _load_here(state, url)
    model.load_state_dict({**state.get("model", {}), **state.get(weights, {})})
    return spec, model, meta["stage"]


def export_safetensors(url: str, out: str, registry: Registry, *, verify: bool = True) -> dict[str, Any]:
    """Consolidated EMA weights + the resolved spec (metadata) as one safetensors file."""
    from safetensors.torch import save

    spec, model, stage = load_checkpoint(url, registry, verify=verify)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"vermeer_spec": json.dumps(spec.model_dump(mode="json")), "stage": str(stage),
                "resolution": str(model.resolution)}
    atomic_write_bytes(out, save(tensors, metadata=metadata))
    return {"tensors": len(tensors), "stage": stage, "resolution": model.resolution}


_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _safetensors_metadata(blob: bytes, url: str) -> tuple[Any, int]:
    """(the spec mapping, stage) from a vermeer safetensors export's header, or
    :class:`InferenceError` saying what is wrong with the file (no traceback)."""
    def bad(why: str) -> InferenceError:
        return InferenceError(f"{url} is not a vermeer safetensors export: {why}; export it with `vermeer export`")

    if len(blob) < 8:
        raise bad(f"{len(blob)} bytes, shorter than the 8-byte header length")
    header_len = int.from_bytes(blob[:8], "little")
    if header_len > min(_MAX_HEADER, len(blob) - 8):
        raise bad(f"its header claims {header_len} bytes but the file has {len(blob) - 8} after the length "
                  "(truncated or not safetensors)")
    try:
        header = json.loads(blob[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or "vermeer_spec" not in metadata:
        raise bad("no vermeer_spec metadata")
    try:
        spec_data = json.loads(metadata["vermeer_spec"])
        stage = int(metadata["stage"])
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"its vermeer_spec/stage metadata is malformed ({type(exc).__name__}: {exc})") from None
    if not isinstance(spec_data, dict) or stage < 0:
        raise bad("its vermeer_spec metadata is not a spec mapping, or its stage is negative")
    return spec_data, stage


def load_model(url: str, registry: Registry, *, verify: bool = True) -> tuple[RunSpec, VermeerModel, int]:
    """From a ``.safetensors`` export or a checkpoint/run directory."""
    if url.endswith(".safetensors"):
        from safetensors.torch import load

        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise InferenceError(f"no such weights file: {url}")
        with fs.open(path, "rb") as f:
            blob = f.read()
        spec_data, stage = _safetensors_metadata(blob, url)
        spec = parse_spec(spec_data, registry, source=url)
        if stage >= len(spec.stages):
            raise InferenceError(f"{url}: its metadata says stage {stage}, but its spec has {len(spec.stages)} stages; "
                                 "export it again with `vermeer export`")
        model = replay(spec, registry, stage)
        try:
            state = load(blob)
        except Exception as exc:  # noqa: BLE001 - safetensors' own SafetensorError and friends
            raise InferenceError(f"{url} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                                 "export it again with `vermeer export`") from None
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[:3]
            raise InferenceError(f"{url}: its tensors do not match the model its spec describes at stage {stage}: "
                                 f"{' '.join(first)}; export it again with `vermeer export`") from None
        return spec, model, stage
    return load_checkpoint(url, registry, verify=verify)

