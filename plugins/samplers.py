"""Reverse-process samplers over a log-SNR grid: ``ddpm``, ``ddim`` and ``dpmpp-2m``.

Each works on a :class:`~vermeer_core.interfaces.Denoiser` (x_t, logsnr) -> x0_hat, so
classifier-free guidance and the model's parametrisation are already folded in. The grid
``logsnrs`` runs from the noisiest level (``logsnrs[0]``, where ``noise`` is taken as x_t) to
the cleanest; after the last step the sampler returns the denoiser's x0 estimate at the last
grid point, so a run costs ``steps + 1`` denoiser calls.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from vermeer_core.api import alpha_sigma, ComponentConfig, Denoiser, hookimpl, noise_like, Registry

__all__ = [
    "DDIMConfig",
    "DDIMSampler",
    "DDPMConfig",
    "DDPMSampler",
    "DPMPP2MConfig",
    "DPMPP2MSampler",
    "vermeer_register",
]


def _check_grid(noise: Tensor, logsnrs: Tensor) -> None:
    if logsnrs.ndim != 1 or logsnrs.numel() < 2:
        raise ValueError(f"logsnrs must be a 1-D grid of steps + 1 >= 2 levels, got shape {tuple(logsnrs.shape)}")
    if not bool((logsnrs[1:] > logsnrs[:-1]).all()):
        raise ValueError("logsnrs must increase strictly (noisiest level first); build it from t = 1 down to 0")
    if noise.ndim == 0:
        raise ValueError("noise must have a batch axis")


def _level(logsnr: Tensor, x: Tensor) -> Tensor:
    """The grid's scalar log-SNR as the (B,) tensor the Denoiser protocol takes. Kept in the
    grid's dtype even for bf16 ``x``: bf16 would round log-SNR 15 to steps of 0.06."""
    return logsnr.expand(x.shape[0])


class DDIMSampler:
    """DDIM (Song et al. 2021) with stochasticity ``eta``: 0 is the deterministic probability
    flow discretisation, 1 is ancestral DDPM sampling (Ho et al. 2020)."""

    def __init__(self, eta: float = 0.0) -> None:
        self.eta = eta

    def sample(
        self, denoise: Denoiser, noise: Tensor, logsnrs: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        _check_grid(noise, logsnrs)
        alphas, sigmas = alpha_sigma(logsnrs)
        x = noise
        for i in range(logsnrs.numel() - 1):
            x0 = denoise(x, _level(logsnrs[i], x))
            a_s, s_s, a_t, s_t = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
            # eps implied by x0 at the current level; the step keeps x0 and re-noises it to the
            # next level. Posterior std of q(x_t | x_s, x0) is sigma_t * sqrt(1 - SNR_s / SNR_t).
            eps = (x - a_s * x0) / s_s
            x = a_t * x0
            if self.eta > 0.0:
                c = self.eta * s_t * torch.sqrt(-torch.expm1(logsnrs[i] - logsnrs[i + 1]))
                # clamp: eta > 1 asks for more noise than the posterior has; cap at sigma_t.
                c = torch.minimum(c, s_t)
                x = x + torch.sqrt(s_t**2 - c**2) * eps + c * noise_like(x, generator)
            else:
                x = x + s_t * eps
        return denoise(x, _level(logsnrs[-1], x))


class DDPMSampler(DDIMSampler):
    """Ancestral sampling of DDPM (Ho et al. 2020): DDIM with eta = 1; uses ``generator``."""

    def __init__(self) -> None:
        super().__init__(eta=1.0)


class DPMPP2MSampler:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep, data-prediction form, in
    ``lambda = logsnr / 2`` (log alpha/sigma); first and last steps are first order (= DDIM)."""

    def sample(
        self, denoise: Denoiser, noise: Tensor, logsnrs: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        _check_grid(noise, logsnrs)
        alphas, sigmas = alpha_sigma(logsnrs)
        lambdas = logsnrs / 2
        x = noise
        x0_prev: Tensor | None = None
        h_prev: Tensor | None = None
        last = logsnrs.numel() - 2
        for i in range(last + 1):
            x0 = denoise(x, _level(logsnrs[i], x))
            h = lambdas[i + 1] - lambdas[i]
            # First order at the first step (no history) and at the last one ("lower order
            # final" of Lu et al.'s reference solver): a clipped schedule's final lambda step is
            # several times its predecessor, and extrapolating x0 across it is unstable. One
            # first-order step leaves the global order at 2.
            if x0_prev is None or h_prev is None or i == last:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            # x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D; expm1 keeps small h exact.
            x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * torch.expm1(-h) * d
            x0_prev, h_prev = x0, h
        return denoise(x, _level(logsnrs[-1], x))


class DDPMConfig(ComponentConfig):
    pass


class DDIMConfig(ComponentConfig):
    eta: float = Field(0.0, ge=0.0, description="0 = deterministic DDIM, 1 = ancestral (DDPM) noise")


class DPMPP2MConfig(ComponentConfig):
    pass


def build_ddpm(config: DDPMConfig) -> DDPMSampler:
    return DDPMSampler()


def build_ddim(config: DDIMConfig) -> DDIMSampler:
    return DDIMSampler(eta=config.eta)


def build_dpmpp_2m(config: DPMPP2MConfig) -> DPMPP2MSampler:
    return DPMPP2MSampler()


@hookimpl
def vermeer_register(registry: Registry) -> None:
    registry.add("sampler", "ddpm", build_ddpm, DDPMConfig)
    registry.add("sampler", "ddim", build_ddim, DDIMConfig)
    registry.add("sampler", "dpmpp-2m", build_dpmpp_2m, DPMPP2MConfig)
