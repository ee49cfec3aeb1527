"""The engine's training step on the quickstart spec's stages, for the benchmarks and the profiler.

``quickstart_spec()`` is ``specs/quickstart.yaml`` (32, 64 px) plus 128 and 256 px stages grown
like its last one; ``engine_step`` is what ``vermeer run`` does per batch on a device (FSDP2 at
world size 1, :class:`~vermeer_core.step.TrainStep`: fused AdamW, clipping, EMA, per-example
RNG), minus logging and checkpoints. Shared by ``test_baselines.py``, ``test_train_throughput.py``
and ``profile_step.py`` so that they time and profile the same step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vermeer_core.ema import EMA
from vermeer_core.model import VermeerModel, apply_phase, build_stage_model, stage_phases
from vermeer_core.optim import build_optimizer
from vermeer_core.plugins import get_registry
from vermeer_core.spec import RunSpec, parse_spec
from vermeer_core.step import TrainStep, make_loss_fn

__all__ = ["EXTRA_RESOLUTION", "QUICKSTART", "engine_step", "quickstart_spec", "stage_models"]

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "specs" / "quickstart.yaml"
EXTRA_RESOLUTION = 256  # grown stages up to this resolution


def quickstart_spec() -> RunSpec:
    """``specs/quickstart.yaml`` (32, 64) plus 128x128 and 256x256 stages grown the same way as
    its last stage (with fresh outer layers: ``init: inherit`` only grows the core's stage)."""
    data = yaml.safe_load(QUICKSTART.read_text())
    widths = data["model"]["widths"]
    last = copy.deepcopy(data["stages"][-1])
    last["growth"].pop("init", None)
    for r in range(2 * max(s["resolution"] for s in data["stages"]), EXTRA_RESOLUTION + 1):
        if r & (r - 1) == 0:  # powers of two only
            widths.setdefault(r, widths[max(widths)])
            data["stages"].append({**copy.deepcopy(last), "resolution": r})
    return parse_spec(data, get_registry(), f"{QUICKSTART.name} + stages to {EXTRA_RESOLUTION}")


def stage_models(spec: RunSpec, upto: int | None = None) -> list[VermeerModel]:
    """Each stage's model up to stage ``upto`` (default: all), grown stage by stage on the CPU
    (later stages share the earlier ones' modules: copy before training one)."""
    reg = get_registry()
    models: list[VermeerModel] = []
    for k in range(len(spec.stages) if upto is None else upto + 1):
        models.append(build_stage_model(spec, reg, k, prev=models[-1] if models else None))
    return models


def engine_step(
    model: nn.Module, spec: RunSpec, stage: int, batch_size: int, device: torch.device, mesh: Any, *,
    bf16: bool = False, prepare: Callable[[nn.Module], None] | None = None,
    shard: bool = True,
) -> Callable[[], Any]:
    """The engine's step of ``stage``'s last phase on a fixed batch, for a private ``model``
    (it is sharded and trained here). ``bf16``: autocast on CPU, FSDP2 bf16 parameters on
    CUDA, as the engine does. ``prepare(model)`` runs before sharding (ablations and A/B
    variants patch modules there). ``shard=False``: the plain module, not wrapped by FSDP2 (an ablation: what
    FSDP2's DTensor parameters cost at world size 1)."""
    from vermeer_core.distributed import parallelize

    reg = get_registry()
    resolution = spec.stages[stage].resolution
    model = model.to(device)
    if prepare is not None:
        prepare(model)
    if shard:
        parallelize(model, mesh, bf16=bf16 and device.type == "cuda")
    names = apply_phase(model, stage_phases(spec, reg, stage)[-1])  # type: ignore[arg-type]
    o = spec.optim
    opt = build_optimizer(model, names, {}, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    ts = TrainStep(
        model=model, ema=EMA(model, spec.ema.decay), opt=opt, trainable=names,
        loss_fn=make_loss_fn(schedule=reg.build(spec.diffusion.schedule, "noise_schedule"), resolution=resolution,
                             prediction=spec.diffusion.prediction, cond_drop=spec.diffusion.cond_drop),
        lr_at=lambda s: o.lr, first=0, seed=spec.seed, grad_clip=o.grad_clip, device=device, rank=0, world_size=1,
        local_batch=batch_size, autocast_bf16=bf16 and device.type == "cpu",
    )
    data = reg.build(spec.data, "dataset", resolution=resolution, batch_size=batch_size, rank=0, world_size=1, seed=0)
    b = next(iter(data))
    images = b.images.to(device)
    fixed = type("Batch", (), {"images": images, "captions": list(b.captions)})()
    return lambda: ts(fixed)


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy (stage models share modules; each timed variant trains its own)."""
    return copy.deepcopy(model)
