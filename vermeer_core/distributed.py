"""Process group, device mesh and FSDP2 sharding. Model code knows nothing of this module."""

from __future__ import annotations

import datetime
import logging
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils._pytree import tree_map_only
from torch.utils.checkpoint import checkpoint

__all__ = ["DistInfo", "init_distributed", "shutdown", "end_process", "parallelize", "reshard_all", "default_fsdp_settings"]


# Set once this process has joined a process group; :func:`end_process` reads it.
_joined = False


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    backend: str


def _pick_device(local_rank: int, device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(*, device: str = "auto", replicate: int = 1) -> DistInfo:
    """Join the process group torchrun set up (RANK/WORLD_SIZE/MASTER_* in the environment), or
    make a world of one with an in-process store: the same code path at every world size."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    dev = _pick_device(local_rank, device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        if launched:
            dist.init_process_group(backend, timeout=timeout, device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    global _joined
    _joined = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % replicate:
        raise ValueError(f"train.replicate={replicate} must divide the world size {world}")
    if replicate > 1:
        # HSDP: replicate across groups (e.g. nodes), shard within each group
        mesh = init_device_mesh(dev.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("shard",))
    return DistInfo(rank, world, local_rank, dev, mesh, backend)


def shutdown() -> None:
    """Leave the process group: a barrier (every rank has finished its collectives), then
    ``destroy_process_group``. A process that called this should end with :func:`end_process`."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """End this process with exit status ``code``. A process that joined a process group ends
    with ``os._exit`` once stdout, stderr and logging are flushed, skipping the interpreter's
    finalisation; any other process ends with ``SystemExit``.

    Why: ``destroy_process_group`` does not stop gloo's worker threads. The DeviceMesh still
    holds the group, and torch's DTensor caches hold the mesh. A worker thread may still be
    releasing the last collective's work when the main thread starts to finalise. The work
    holds Python-owned tensors, so the release needs the GIL. During finalisation Python ends
    any thread that asks for the GIL. Here that thread is inside a C++ destructor, so the
    process aborts: "terminate called without an active exception", SIGABRT, after all its
    output is written. The backtrace from a core dump:
    ``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` -> ``~AsyncAllgatherWork`` ->
    ``TensorImpl::decref_pyobject`` -> ``take_gil`` -> ``pthread_exit``.
    Measured: about 1 launch in 6-50 of ``tests/sample_worker.py`` at world size 2 on 2 busy
    cores; the barrier in :func:`shutdown` narrows the window but does not close it. The
    same failure is described in pytorch/pytorch PR #179291."""
    if not _joined:
        raise SystemExit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to flush
            pass
    os._exit(code)


def _checkpointed_forward(module: nn.Module) -> None:
    """Activation checkpointing by wrapping the instance's forward: parameter names (and so
    checkpoints) stay the same, unlike torch's checkpoint_wrapper which renames them."""
    inner = module.forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = types.MethodType(forward, module)


def sharded_units(model: nn.Module) -> list[nn.Module]:
    """The repeated pieces sharded on their own: each core block, each encoder/decoder stage and
    the text encoder (the root takes what is left: stem, head, conditioning, shallow blocks)."""
    units: list[nn.Module] = list(getattr(model.core, "blocks", []))
    units += list(model.encoders.values()) + list(model.decoders.values())
    units.append(model.text)
    return units


def _cast_inputs_but_logsnr(dtype: torch.dtype) -> Any:
    """A root forward pre-hook doing what FSDP2's ``cast_forward_inputs`` does (floating inputs
    to the compute dtype) for every input but ``logsnr`` (positional 1 or keyword), which stays
    in its own precision: bf16 has 8 significant bits, so log-SNR 14.9 would become 14.875 and
    nearby noise levels would collapse onto one before the time embedding sees them."""

    def cast(x: Any) -> Any:
        return tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, x)

    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args = tuple(a if i == 1 else cast(a) for i, a in enumerate(args))
        kwargs = {k: v if k == "logsnr" else cast(v) for k, v in kwargs.items()}
        return args, kwargs

    return hook


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    bf16: bool = False,
    activation_checkpointing: bool = False,
    compile: bool = False,
    reshard_after_forward: bool = True,
    prefetch: int = 0,
) -> nn.Module:
    """FSDP2 (``fully_shard``) per repeated unit, then the root (torchtitan's recipe).

    ``bf16`` casts parameters to bf16 for compute with fp32 gradient reduction (the engine asks
    for it on GPU; on CPU it uses autocast instead, since gloo's reduce-scatter of bf16 is
    slow, but the policy works there too). Each unit casts its floating inputs to bf16; the
    root casts all of its inputs but log-SNR, which reaches the conditioning in fp32.

    ``reshard_after_forward``: free each unit's gathered parameters after its forward (and
    gather them again in backward); False keeps them gathered from forward to backward (less
    traffic, more memory; a forward without backward, as in sampling, then leaves units
    unsharded, so callers :func:`reshard_all` before touching parameters). ``prefetch``: units
    whose all-gather each unit issues ahead in forward and backward (FSDP2's explicit prefetching; 0 = its implicit one-ahead behaviour). Chosen by
    measurement: ``benchmarks/test_baselines.py::test_world_sizes``.
    """
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    units = sharded_units(model)
    # forward's order (VermeerModel.forward): text, encoders, core blocks, decoders outward
    order = [model.text, *model.encoders.values(), *getattr(model.core, "blocks", []), *reversed(model.decoders.values())]
    for unit in units:
        if activation_checkpointing and unit is not model.text:
            _checkpointed_forward(unit)
        if compile:
            unit.compile()
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if bf16:
        root_mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        fully_shard(model, mesh=mesh, mp_policy=root_mp)
        model.register_forward_pre_hook(_cast_inputs_but_logsnr(torch.bfloat16), with_kwargs=True)
    else:
        fully_shard(model, mesh=mesh, mp_policy=mp)
    if prefetch > 0:
        for i, unit in enumerate(order):
            unit.set_modules_to_forward_prefetch(order[i + 1:i + 1 + prefetch])  # type: ignore[operator]
            unit.set_modules_to_backward_prefetch(order[max(0, i - prefetch):i][::-1])  # type: ignore[operator]
    return model


def reshard_all(model: nn.Module) -> None:
    """Reshard every FSDP2 unit of ``model`` and the root: after a forward without backward
    (sampling) gathered parameters stay in place (always the root's, every unit's when
    ``reshard_after_forward=False``), and writes to parameters must reach the shards."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def default_fsdp_settings(device: torch.device) -> dict[str, Any]:
    """``parallelize``'s FSDP2 settings for ``device``, chosen by measurement
    (``benchmarks/test_baselines.py::test_world_sizes``, README "Performance"): on CPU (gloo,
    where each collective is a blocking copy) keeping units gathered from forward to backward
    gave the fastest world-size-2 step in every measurement (interleaved, shared machine: best
    step 3.15 s against 3.55 s resharding and 3.72 s with explicit prefetch of one unit), and
    explicit prefetching gained nothing. On CUDA FSDP2's defaults (reshard after forward:
    per-rank parameter memory 1/world size; NCCL overlaps the re-gather) stand: not measured,
    no GPU was lent."""
    return {"reshard_after_forward": device.type == "cuda", "prefetch": 0}
