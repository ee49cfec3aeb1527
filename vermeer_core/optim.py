"""AdamW per phase, with optimizer state carried by parameter name across phases and growth,
and the per-phase learning-rate schedule (linear warmup, then constant or cosine)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vermeer_core.phases import ParamGroup

__all__ = ["lr_factor", "build_optimizer", "park_state", "state_skeleton", "fused_available", "OptimState"]

#: parameter name -> AdamW state ({"step", "exp_avg", "exp_avg_sq"}) of every parameter that
#: has ever trained, including currently frozen ones ("parked": held here, not in the optimizer).
OptimState = dict[str, dict[str, Tensor]]


def lr_factor(step_in_phase: int, phase_steps: int, warmup: int, decay: str) -> float:
    """Multiplier of the base lr at 0-based ``step_in_phase``: linear warmup over ``warmup``
    steps, then constant, or cosine to 0 at the phase's end (Loshchilov & Hutter, SGDR 2017)."""
    if warmup > 0 and step_in_phase < warmup:
        return (step_in_phase + 1) / warmup
    if decay == "cosine":
        span = max(1, phase_steps - warmup)
        progress = min(1.0, (step_in_phase - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_optimizer(
    model: nn.Module, trainable: set[str] | frozenset[str] | Sequence[ParamGroup], state: OptimState, *, lr: float,
    betas: tuple[float, float], eps: float, weight_decay: float, fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over exactly the ``trainable`` parameters (frozen ones get no state): a set of
    names (one group at ``lr``) or the phase's :class:`ParamGroup` list (each at ``lr`` x its
    ``lr_mult``; torch param groups carry ``lr_mult`` and the ``group`` name, so the caller
    schedules ``g["lr"] = lr * g["lr_mult"]``). Parameters with an entry in ``state`` resume
    from it. Biases and norm gains get no weight decay.

    ``fused=None`` picks torch's fused AdamW wherever its kernel exists (:func:`fused_available`:
    CPU and CUDA floating parameters), else the foreach one. Fused is one kernel per dtype
    and device instead of ~10 foreach passes, and it takes ``opt.found_inf`` (a device
    scalar, 1.0 = skip this update, as ``GradScaler`` uses it): the engine skips non-finite
    steps without reading a device value on the host."""
    if isinstance(trainable, (set, frozenset)):
        trainable = [ParamGroup("all", 1.0, frozenset(trainable))]
    names: dict[nn.Parameter, str] = {}
    groups: list[dict[str, Any]] = []
    named = list(model.named_parameters())
    for group in trainable:
        decay, no_decay = [], []
        for name, p in named:
            if name in group.names:
                (no_decay if p.ndim <= 1 else decay).append(p)
                names[p] = name
        extra = {"lr": lr * group.lr_mult, "lr_mult": group.lr_mult, "group": group.name}
        groups += [g for g in (
            {"params": decay, "weight_decay": weight_decay, **extra},
            {"params": no_decay, "weight_decay": 0.0, **extra},
        ) if g["params"]]
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = fused_available(params)
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    opt._vermeer_names = names  # type: ignore[attr-defined]
    for p, name in names.items():
        if name in state:
            opt.state[p] = state[name]
    return opt


def park_state(opt: torch.optim.Optimizer, state: OptimState) -> None:
    """Copy the optimizer's per-parameter state into ``state`` by name (before the optimizer is
    dropped at a phase change or growth)."""
    names: dict[Any, str] = opt._vermeer_names  # type: ignore[attr-defined]
    for p, s in opt.state.items():
        if s:
            state[names[p]] = s


def fused_available(params: Sequence[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes all of ``params`` (floating, on a device type it
    has a kernel for; DTensors count by their local device)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    ok = set(_get_fused_kernels_supported_devices())
    return bool(params) and all(p.is_floating_point() and p.device.type in ok for p in params)


def state_skeleton(model: nn.Module, names: Sequence[str]) -> OptimState:
    """Zero AdamW state shaped (and sharded) like ``model``'s parameters ``names``: the
    structure a checkpoint's optimizer state is loaded into. ``step`` sits on the parameter's
    device, as the fused kernel keeps it (DCP loads a CPU-saved step into it as well).
    Names the model no longer has are dropped (checkpoints written before a discarded
    module's state was dropped)."""
    params = dict(model.named_parameters())
    out: OptimState = {}
    for n in names:
        if n in params:
            p = params[n].detach()
            out[n] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
    return out
