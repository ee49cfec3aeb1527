"""One training step, ``TrainStep(batch) -> StepResult``, that never waits for the device.

The step's outcome (loss, gradient norm, whether it was skipped) stays in device tensors. A
non-finite loss or gradient on any rank skips the update through a device-side flag, as
``torch.amp.GradScaler`` does: the fused AdamW kernel takes it as ``found_inf`` and leaves
parameters, moments and step count untouched, and the EMA update is multiplied by it. The host
reads these values only when it needs them (the engine: at log steps, checkpoints and phase
ends), so the CPU can queue the next steps while the device works. Where the fused kernel is
unavailable the step falls back to reading the flag (one sync per step).

Randomness is counter-based (see :mod:`vermeer_core.engine`): noise, times and caption drops
of global sample ``i`` at global step ``s`` come from a generator seeded by (seed, s, i), and
model-internal randomness from (seed, s, rank).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from vermeer_core.diffusion import LossWeight, TSampling, diffusion_loss
from vermeer_core.ema import EMA

__all__ = ["StepResult", "TrainStep", "grad_norm", "mix_seed"]


@dataclass(frozen=True)
class StepResult:
    """What one step did, as device tensors (reading one is a host-device sync)."""

    step: int  #: global step just done, 1-based (as metrics and checkpoints count)
    lr: float  #: base learning rate of the step (before group multipliers)
    loss: Tensor  #: 0-d, the loss averaged over ranks
    grad_norm: Tensor  #: 0-d, the global gradient norm before clipping
    skipped: Tensor  #: 0-d float32, 1.0 if the loss or a gradient was non-finite on any rank


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = hashlib.blake2b(",".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def grad_norm(params: Sequence[nn.Parameter], max_norm: float | None, device: torch.device) -> Tensor:
    """The global gradient norm of ``params`` (clipping them to ``max_norm`` when given), as a
    device tensor: no ``float()``, so no sync (``clip_grad_norm_`` scales on the device)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm


class TrainStep:
    """The training step of one phase: forward (diffusion loss), backward, clip, AdamW, EMA.

    Called once per batch; it counts global steps from ``first`` (0-based, so the first call
    returns ``StepResult.step == first + 1``). ``lr_at(step)`` gives the base lr of a 0-based
    global step; each optimizer group runs at that times its ``lr_mult``.
    """

    def __init__(
        self, *, model: nn.Module, ema: EMA, opt: torch.optim.Optimizer, trainable: set[str],
        loss_fn: Callable[..., Tensor], lr_at: Callable[[int], float], first: int, seed: int,
        grad_clip: float | None, device: torch.device, rank: int, world_size: int, local_batch: int,
        autocast_bf16: bool,
    ) -> None:
        self.model, self.ema, self.opt, self.trainable = model, ema, opt, trainable
        self.params = [p for n, p in model.named_parameters() if n in trainable]
        self.loss_fn, self.lr_at = loss_fn, lr_at
        self.step = first
        self.seed, self.grad_clip = seed, grad_clip
        self.device, self.rank, self.world = device, rank, world_size
        self.local_batch = local_batch
        self.autocast_bf16 = autocast_bf16
        self.fused = bool(opt.defaults.get("fused"))

    def __call__(self, batch: Any) -> StepResult:
        step, done = self.step, self.step + 1
        lr = self.lr_at(step)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        torch.manual_seed(mix_seed(self.seed, step, self.rank, 1))
        # Seed by position i*w + r in the global batch: where rank r's i-th example sits when
        # a dataset interleaves ranks (synthetic: rank r takes samples r, r+w, ...), so each
        # image gets the same noise at any world size (rank*local + i would not).
        gens = [
            torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, step, i * self.world + self.rank))
            for i in range(self.local_batch)
        ]
        images = batch.images.to(self.device, non_blocking=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            loss = self.loss_fn(self.model, images, batch.captions, generator=gens)
        if fault_nan(done):
            loss = loss * float("nan")
        loss.backward()
        norm = grad_norm(self.params, self.grad_clip, self.device)
        loss = loss.detach().float()
        bad = (~torch.isfinite(loss) | ~torch.isfinite(norm)).float()
        if self.world > 1:  # one small collective, queued like the others: no sync
            stats = torch.stack([loss, bad])
            dist.all_reduce(stats)
            loss, bad = stats[0] / self.world, (stats[1] > 0).float()
        if self.fused:
            self.opt.found_inf = bad  # type: ignore[attr-defined]  # read by the fused kernel
            self.opt.step()
            self.ema.update(self.model, self.trainable, applied=1.0 - bad)
        elif not bool(bad):  # no fused kernel: the flag has to be read here
            self.opt.step()
            self.ema.update(self.model, self.trainable)
        self.opt.zero_grad(set_to_none=True)
        self.step = done
        return StepResult(done, lr, loss, norm.detach().float(), bad)


def make_loss_fn(
    *, schedule: Any, resolution: int, prediction: str, cond_drop: float,
    t_sampling: TSampling = TSampling(), loss_weight: LossWeight = LossWeight(),
) -> Callable[..., Tensor]:
    """The diffusion loss with the run's fixed arguments bound."""

    def fn(model: nn.Module, images: Tensor, captions: Sequence[str], generator: list[torch.Generator]) -> Tensor:
        return diffusion_loss(model, images, captions, schedule=schedule, resolution=resolution,  # type: ignore[arg-type]
                              prediction=prediction, cond_drop=cond_drop, generator=generator,  # type: ignore[arg-type]
                              t_sampling=t_sampling, loss_weight=loss_weight)

    return fn


def fault_nan(step: int) -> bool:
    """Test-only fault injection: ``VERMEER_FAULT=nan:<first>-<last>`` makes the loss NaN at
    those global steps (1-based, as metrics count them; proves the skip-and-stop path)."""
    spec = os.environ.get("VERMEER_FAULT", "")
    if not spec.startswith("nan:"):
        return False
    lo, _, hi = spec[4:].partition("-")
    return int(lo) <= step <= int(hi or lo)
