"""Cosine log-SNR noise schedules of simple diffusion (Hoogeboom, Heek & Salimans 2023).

Three ``noise_schedule`` components:

* ``cosine``: ``logsnr(t) = -2 log tan(pi t / 2)``, clipped to [logsnr_min, logsnr_max] by
  mapping t into [t_min, t_max]; ignores resolution.
* ``shifted-cosine``: ``cosine(t) + 2 log(base_resolution / resolution)`` — an image of
  ``resolution`` is noised as a ``base_resolution`` image would be (simple diffusion §3.1).
* ``interpolated-cosine``: ``t * shifted_low(t) + (1 - t) * shifted_high(t)``, the
  "interpolating schedules" of simple diffusion §3.1 (arXiv 2301.11093; the same form is in
  lucidrains/simple-diffusion ``logsnr_schedule_interpolated``): the shift of the low base
  resolution rules the noisy end (t = 1, global structure), that of the high base resolution
  the clean end (t = 0, fine detail).

Where the clip applies: [logsnr_min, logsnr_max] bounds the *unshifted* cosine, and the shift
is added after it, exactly as in the paper's listing. So a shifted schedule spans
[logsnr_min + shift, logsnr_max + shift] — the bounds are in "base-resolution" units — and the
shift is exactly ``2 log(base / resolution)`` at every t, ends included. All three schedules
share this one clipped cosine, so they clip consistently.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import Tensor

from vermeer_core.api import ComponentConfig, hookimpl, Registry

__all__ = [
    "CosineConfig",
    "CosineSchedule",
    "InterpolatedCosineConfig",
    "InterpolatedCosineSchedule",
    "ShiftedCosineConfig",
    "ShiftedCosineSchedule",
    "logsnr_cosine",
    "resolution_shift",
    "vermeer_register",
]


def logsnr_cosine(t: Tensor, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> Tensor:
    """Clipped cosine log-SNR of simple diffusion (Hoogeboom et al. 2023):
    ``-2 log tan(u)``, ``u = t_min + t (t_max - t_min)``, so logsnr(0) = max, logsnr(1) = min."""
    u_min = math.atan(math.exp(-0.5 * logsnr_max))
    u_max = math.atan(math.exp(-0.5 * logsnr_min))
    u = u_min + t * (u_max - u_min)
    # Near t = 1, u is close to pi/2 and rounding u costs tan() most of its precision (in
    # fp32). tan(pi/2 - u) = 1 / tan(u), so there we use +2 log tan(w) with w = pi/2 - u
    # computed from 1 - t (exact in floating point for t >= 1/2) to avoid the cancellation.
    w_min = math.atan(math.exp(0.5 * logsnr_min))  # = pi/2 - u_max
    w = w_min + (1 - t) * (u_max - u_min)
    return torch.where(u <= w, -2.0 * torch.log(torch.tan(u)), 2.0 * torch.log(torch.tan(w)))


def resolution_shift(base_resolution: int, resolution: int) -> float:
    """Log-SNR shift ``2 log(base / resolution)`` of simple diffusion (Hoogeboom et al. 2023)."""
    if resolution <= 0:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    return 2.0 * math.log(base_resolution / resolution)


class CosineConfig(ComponentConfig):
    logsnr_min: float = Field(-15.0, description="log-SNR at t = 1 (before any resolution shift)")
    logsnr_max: float = Field(15.0, description="log-SNR at t = 0 (before any resolution shift)")

    @model_validator(mode="after")
    def _ordered(self) -> CosineConfig:
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(
                f"logsnr_min ({self.logsnr_min}) must be below logsnr_max ({self.logsnr_max}); swap them"
            )
        return self


class ShiftedCosineConfig(CosineConfig):
    base_resolution: int = Field(64, gt=0, description="resolution whose noise levels the schedule keeps")


class InterpolatedCosineConfig(CosineConfig):
    base_resolution_low: int = Field(32, gt=0, description="base resolution of the shift used at t = 1")
    base_resolution_high: int = Field(256, gt=0, description="base resolution of the shift used at t = 0")

    @model_validator(mode="after")
    def _low_high(self) -> InterpolatedCosineConfig:
        if self.base_resolution_low > self.base_resolution_high:
            raise ValueError(
                f"base_resolution_low ({self.base_resolution_low}) must not exceed "
                f"base_resolution_high ({self.base_resolution_high}); swap them"
            )
        return self


class CosineSchedule:
    """The clipped cosine schedule; the same at every resolution."""

    def __init__(self, config: CosineConfig) -> None:
        self.config = config

    def logsnr(self, t: Tensor, resolution: int) -> Tensor:
        return logsnr_cosine(t, self.config.logsnr_min, self.config.logsnr_max)


class ShiftedCosineSchedule(CosineSchedule):
    """Cosine shifted by ``2 log(base_resolution / resolution)``."""

    config: ShiftedCosineConfig

    def logsnr(self, t: Tensor, resolution: int) -> Tensor:
        shift = resolution_shift(self.config.base_resolution, resolution)
        return logsnr_cosine(t, self.config.logsnr_min, self.config.logsnr_max) + shift


class InterpolatedCosineSchedule(CosineSchedule):
    """``t * shifted_low(t) + (1 - t) * shifted_high(t)`` (simple diffusion §3.1)."""

    config: InterpolatedCosineConfig

    def logsnr(self, t: Tensor, resolution: int) -> Tensor:
        low = resolution_shift(self.config.base_resolution_low, resolution)
        high = resolution_shift(self.config.base_resolution_high, resolution)
        # Both terms share the cosine, so t*(c + low) + (1-t)*(c + high) = c + high + t*(low - high):
        # one cosine evaluation, and strictly decreasing because low <= high.
        return logsnr_cosine(t, self.config.logsnr_min, self.config.logsnr_max) + high + t * (low - high)


def build_cosine(config: CosineConfig) -> CosineSchedule:
    return CosineSchedule(config)


def build_shifted(config: ShiftedCosineConfig) -> ShiftedCosineSchedule:
    return ShiftedCosineSchedule(config)


def build_interpolated(config: InterpolatedCosineConfig) -> InterpolatedCosineSchedule:
    return InterpolatedCosineSchedule(config)


@hookimpl
def vermeer_register(registry: Registry) -> None:
    registry.add("noise_schedule", "cosine", build_cosine, CosineConfig)
    registry.add("noise_schedule", "shifted-cosine", build_shifted, ShiftedCosineConfig)
    registry.add("noise_schedule", "interpolated-cosine", build_interpolated, InterpolatedCosineConfig)
