"""Diffusion math, the training loss, classifier-free guidance and the sampling loop.

Engine-free and model-agnostic: a *model* here is any object with
``encode_text(captions) -> TextEmbedding`` and ``model(x_t, logsnr, text) -> raw output``
where ``logsnr`` is (B,) and the raw output is a ``v`` or ``eps`` prediction shaped like
``x_t``. The forward process is variance preserving, ``x_t = alpha x0 + sigma eps`` with
``alpha^2 = sigmoid(logsnr)`` and ``sigma^2 = sigmoid(-logsnr)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from vermeer_core.interfaces import Denoiser, NoiseSchedule, Sampler, SamplerCallback, TextEmbedding

__all__ = [
    "BatchRows",
    "DiffusionModel",
    "Grid",
    "LossWeight",
    "Prediction",
    "TSampling",
    "alpha_sigma",
    "diffusion_loss",
    "guided_denoiser",
    "logsnr_grid",
    "noise_like",
    "sample",
    "target",
    "to_eps",
    "to_x0",
]

Prediction = Literal["v", "eps"]
_PREDICTIONS: tuple[str, ...] = get_args(Prediction)
Grid = Literal["logsnr", "t"]
_GRIDS: tuple[str, ...] = get_args(Grid)


class DiffusionModel(Protocol):
    """What the loss and the sampler need from a model (a VermeerModel or a test fake)."""

    def encode_text(self, captions: Sequence[str]) -> TextEmbedding: ...

    def __call__(self, x: Tensor, logsnr: Tensor, text: TextEmbedding | Sequence[str]) -> Tensor:
        """``text`` is an embedding from ``encode_text`` or the captions themselves (then encoded
        inside the forward: what training uses, so a sharded model sees one root forward)."""


def _check_prediction(prediction: str) -> None:
    if prediction not in _PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(_PREDICTIONS)}, got {prediction!r}")


def _per_example(a: Tensor, x: Tensor) -> Tensor:
    """View a (B,) coefficient as (B, 1, ..., 1) so it scales whole examples of ``x``.

    Plain broadcasting would align a (B,) tensor with the *last* axis of ``x``, which is
    silently wrong whenever the width happens to equal the batch size.
    """
    if a.ndim == 1 and x.ndim > 1:
        return a.view(a.shape[0], *([1] * (x.ndim - 1)))
    return a


@dataclass(frozen=True)
class BatchRows:
    """Rows ``rows`` of a batch of ``total`` images, drawn from ``generator``: every draw
    makes the whole batch's numbers and keeps these rows. A rank that samples its share of a
    batch thus gives each image the noise it gets when one process samples the whole batch
    (samplers draw through :func:`noise_like`, which knows this type)."""

    generator: torch.Generator
    total: int
    rows: tuple[int, ...]


def _randn(
    shape: Sequence[int], generator: torch.Generator | BatchRows | None, device: torch.device | str
) -> Tensor:
    """Standard normal noise from ``generator`` (on the generator's own device), placed on
    ``device``. A CPU generator gives the same numbers whatever device trains."""
    if isinstance(generator, BatchRows):
        if shape[0] != len(generator.rows):
            raise ValueError(f"noise for {shape[0]} images drawn from BatchRows of {len(generator.rows)} rows")
        g = generator.generator
        full = torch.randn((generator.total, *shape[1:]), generator=g, device=g.device)
        return full[list(generator.rows)].to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)


def noise_like(x: Tensor, generator: torch.Generator | BatchRows | None) -> Tensor:
    """N(0, I) shaped like ``x`` (its device and dtype), drawn from ``generator``."""
    # Drawn in fp32 (then cast) so bf16 callers get the same noise as fp32 ones.
    return _randn(x.shape, generator, x.device).to(dtype=x.dtype)


def _rand(n: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device)


@dataclass(frozen=True)
class TSampling:
    """How training draws the diffusion time t in [0, 1].

    ``uniform`` is U[0, 1). ``logit-normal`` is ``t = sigmoid(mean + std * z)``, z ~ N(0, 1)
    (Esser et al. 2024, SD3 §3.1): it spends more of training on mid noise, where layout and
    shape are decided, and less on the nearly clean and nearly pure-noise ends. It is computed
    from the same uniform draw by the inverse normal CDF, so switching it changes no other
    random number of the loss (noise and caption drop stay what they were)."""

    type: Literal["uniform", "logit-normal"] = "uniform"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in ("uniform", "logit-normal"):
            raise ValueError(f"t sampling must be 'uniform' or 'logit-normal', got {self.type!r}")
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"logit-normal t needs a finite mean and std > 0, got mean={self.mean}, std={self.std}")

    def __call__(self, u: Tensor) -> Tensor:
        """Map uniform draws ``u`` in [0, 1) to t."""
        if self.type == "uniform":
            return u
        # Inverse normal CDF, Phi^-1(u) = sqrt(2) erfinv(2u - 1), in fp32 (any device); u is
        # kept off 0 and 1 so |z| <= 4.75 stays finite (a truncation no run can notice).
        z = math.sqrt(2.0) * torch.erfinv((2.0 * u.float() - 1.0).clamp(-1 + 1e-6, 1 - 1e-6))
        return torch.sigmoid(self.mean + self.std * z).to(u.dtype)


@dataclass(frozen=True)
class LossWeight:
    """Per-example weight of the squared error as a function of the noise level.

    ``uniform``: plain MSE of the prediction (for ``v``, x0-error weighted by 1 + SNR).
    ``min-snr``: Min-SNR-gamma (Hang et al. 2023): the x0-error weighted by min(SNR, gamma),
    i.e. ``min(SNR, gamma) / (SNR + 1)`` on the v-error and ``min(SNR, gamma) / SNR`` on the
    eps-error; it stops nearly clean images (SNR > gamma) from dominating the gradient."""

    type: Literal["uniform", "min-snr"] = "uniform"
    gamma: float = 5.0

    def __post_init__(self) -> None:
        if self.type not in ("uniform", "min-snr"):
            raise ValueError(f"loss weight must be 'uniform' or 'min-snr', got {self.type!r}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"min-snr gamma must be a finite number > 0, got {self.gamma}")

    def __call__(self, logsnr: Tensor, prediction: Prediction) -> Tensor:
        """The (B,) weights for log-SNRs ``logsnr``."""
        snr = logsnr.float().exp()
        w = snr.clamp(max=self.gamma)
        return w / (snr + 1.0) if prediction == "v" else w / snr


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """Variance-preserving ``(alpha, sigma)`` for a log-SNR (Kingma et al. 2021, VDM):
    ``alpha^2 = sigmoid(logsnr)``, ``sigma^2 = sigmoid(-logsnr)``; same shape as ``logsnr``."""
    # sigmoid never overflows, so this stays finite for any clipped schedule.
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction: Prediction) -> Tensor:
    """Regression target: ``v = alpha eps - sigma x0`` (Salimans & Ho 2022) or ``eps``.

    ``alpha``/``sigma`` are (B,) or broadcastable against ``x0``."""
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    return _per_example(alpha, x0) * eps - _per_example(sigma, x0) * x0


def to_x0(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: Prediction) -> Tensor:
    """Clean-data estimate from a raw prediction (Salimans & Ho 2022, v-parametrisation).

    For ``v``: ``x0 = alpha x_t - sigma v`` (uses alpha^2 + sigma^2 = 1), stable at every
    noise level. For ``eps``: ``x0 = (x_t - sigma eps) / alpha``, which amplifies errors where
    alpha is tiny (very low log-SNR) — one reason to prefer ``v``."""
    _check_prediction(prediction)
    a, s = _per_example(alpha, x_t), _per_example(sigma, x_t)
    if prediction == "v":
        return a * x_t - s * pred
    return (x_t - s * pred) / a


def to_eps(pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction: Prediction) -> Tensor:
    """Noise estimate from a raw prediction (Salimans & Ho 2022): ``eps = sigma x_t + alpha v``."""
    _check_prediction(prediction)
    if prediction == "eps":
        return pred
    return _per_example(sigma, x_t) * x_t + _per_example(alpha, x_t) * pred


def diffusion_loss(
    model: DiffusionModel,
    images: Tensor,
    captions: Sequence[str],
    *,
    schedule: NoiseSchedule,
    resolution: int,
    prediction: Prediction,
    cond_drop: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    t_sampling: TSampling = TSampling(),
    loss_weight: LossWeight = LossWeight(),
) -> Tensor:
    """Mean squared error of the model's ``prediction`` at t ~ U[0, 1] (Ho et al. 2020, in the
    continuous-time log-SNR form of Kingma et al. 2021), with captions dropped to "" at rate
    ``cond_drop`` so the same model also learns the unconditional input used by CFG.
    ``t_sampling`` may concentrate t (:class:`TSampling`); ``loss_weight`` may weight each
    example's error by its noise level (:class:`LossWeight`); the defaults are the plain loss.

    Randomness comes from ``generator`` in a fixed order (t, noise, caption drop), so the loss
    is a deterministic function of the generator's state; a sequence of generators gives each
    example its own (what the engine uses, for world-size-independent randomness).
    """
    _check_prediction(prediction)
    if not 0.0 <= cond_drop <= 1.0:
        raise ValueError(f"cond_drop is a probability and must lie in [0, 1], got {cond_drop}")
    batch = images.shape[0]
    if len(captions) != batch:
        raise ValueError(f"got {len(captions)} captions for a batch of {batch} images; pass one caption per image")
    device = images.device
    if isinstance(generator, (list, tuple)):
        # One generator per example: example i's (t, noise, drop) depend on its generator only,
        # so a batch split across ranks sees the same numbers as the whole batch on one rank.
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}; pass one per example")
        draws = [(_rand(1, g, device), noise_like(images[:1], g), _rand(1, g, "cpu")) for g in generator]
        t = torch.cat([d[0] for d in draws])
        eps = torch.cat([d[1] for d in draws])
        u = torch.cat([d[2] for d in draws])
    else:
        t = _rand(batch, generator, device)
        eps = noise_like(images, generator)
        u = _rand(batch, generator, "cpu")
    # rand() is in [0, 1), so cond_drop == 1.0 drops every caption and 0.0 none.
    drop = (u < cond_drop).tolist()
    captions = ["" if d else c for c, d in zip(captions, drop)]

    logsnr = schedule.logsnr(t_sampling(t), resolution)
    alpha, sigma = alpha_sigma(logsnr)
    x_t = _per_example(alpha, images) * images + _per_example(sigma, images) * eps
    out = model(x_t, logsnr, captions)
    # fp32 reduction: under bf16 autocast the squared error of small residuals underflows.
    pred, goal = out.float(), target(images, eps, alpha, sigma, prediction).float()
    if loss_weight.type == "uniform":
        return F.mse_loss(pred, goal)
    per_example = ((pred - goal) ** 2).flatten(1).mean(1)
    return (per_example * loss_weight(logsnr, prediction).to(per_example.device)).mean()


def _cat_text(a: TextEmbedding, b: TextEmbedding) -> TextEmbedding:
    """Stack two embeddings along the batch, padding the shorter token axis (mask False)."""
    length = max(a.tokens.shape[1], b.tokens.shape[1])

    def pad(e: TextEmbedding) -> tuple[Tensor, Tensor]:
        extra = length - e.tokens.shape[1]
        if extra == 0:
            return e.tokens, e.mask
        return F.pad(e.tokens, (0, 0, 0, extra)), F.pad(e.mask, (0, extra), value=False)

    (ta, ma), (tb, mb) = pad(a), pad(b)
    return TextEmbedding(
        tokens=torch.cat([ta, tb]), mask=torch.cat([ma, mb]), pooled=torch.cat([a.pooled, b.pooled])
    )


def _expand_text(e: TextEmbedding, batch: int) -> TextEmbedding:
    """Broadcast a one-caption embedding (e.g. the shared "" input) to ``batch`` rows (views)."""
    if e.pooled.shape[0] == batch:
        return e
    if e.pooled.shape[0] != 1:
        raise ValueError(
            f"unconditional text has batch {e.pooled.shape[0]} but the conditional has {batch}; "
            "pass one unconditional embedding or one per caption"
        )
    return TextEmbedding(
        tokens=e.tokens.expand(batch, -1, -1), mask=e.mask.expand(batch, -1), pooled=e.pooled.expand(batch, -1)
    )


def guided_denoiser(
    model: DiffusionModel,
    text_cond: TextEmbedding,
    text_uncond: TextEmbedding | None,
    *,
    prediction: Prediction,
    guidance: float,
) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): ``uncond + w (cond - uncond)``.

    Guidance is applied to the raw model output. For fixed ``(x_t, logsnr)`` the x0, eps and v
    estimates are affine functions of the raw output (see :func:`to_x0`), and an affine map
    commutes with a combination whose weights ``(1 - w, w)`` sum to one, so guiding the raw
    output equals guiding x0, eps or v. ``guidance == 1`` makes one conditional call per step
    (bit-identical to no guidance); otherwise cond and uncond share one batched forward.
    """
    _check_prediction(prediction)
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance}")
    batch = text_cond.pooled.shape[0]
    if guidance == 1.0:

        def denoise(x: Tensor, logsnr: Tensor) -> Tensor:
            alpha, sigma = alpha_sigma(logsnr)
            return to_x0(model(x, logsnr, text_cond), x, alpha, sigma, prediction)

        return denoise

    if text_uncond is None:
        raise ValueError("guidance != 1 needs the unconditional text embedding (encode the empty caption \"\")")
    # Built once here, not per step: every step reuses the same stacked embedding.
    both = _cat_text(text_cond, _expand_text(text_uncond, batch))

    def guided(x: Tensor, logsnr: Tensor) -> Tensor:
        out = model(torch.cat([x, x]), torch.cat([logsnr, logsnr]), both)
        cond, uncond = out.chunk(2)
        alpha, sigma = alpha_sigma(logsnr)
        return to_x0(uncond + guidance * (cond - uncond), x, alpha, sigma, prediction)

    return guided


def logsnr_grid(
    schedule: NoiseSchedule, resolution: int, steps: int, *, grid: Grid = "logsnr", device: torch.device | str = "cpu"
) -> Tensor:
    """The ``steps + 1`` log-SNR levels a sampler walks, noisiest first, between the schedule's
    end points ``logsnr(1)`` and ``logsnr(0)`` at ``resolution``.

    ``"logsnr"`` (the default) spaces them uniformly in log-SNR, so every step crosses the same
    band of noise levels whatever the resolution shift. ``"t"`` spaces them uniformly in t, the
    training distribution: with a shifted cosine the last steps then span wide bands (at
    1024 px from base 64, 50 steps: 1.34 -> 9.45 in one step), which a first-order step
    crosses by collapsing fine detail (see tests/test_sampling_grid.py for the numbers).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if grid not in _GRIDS:
        raise ValueError(f"sampling grid must be one of {', '.join(_GRIDS)}, got {grid!r}")
    if grid == "t":
        return schedule.logsnr(torch.linspace(1.0, 0.0, steps + 1, device=device), resolution)
    ends = schedule.logsnr(torch.tensor([1.0, 0.0], device=device), resolution)
    return torch.linspace(float(ends[0]), float(ends[1]), steps + 1, device=device)


@torch.no_grad()
def sample(
    model: DiffusionModel,
    captions: Sequence[str],
    *,
    schedule: NoiseSchedule,
    sampler: Sampler,
    resolution: int,
    steps: int,
    guidance: float,
    prediction: Prediction,
    generator: torch.Generator | BatchRows | None,
    device: torch.device | str,
    channels: int = 3,
    grid: Grid = "logsnr",
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Generate ``(len(captions), channels, resolution, resolution)`` images in [-1, 1].

    The log-SNR grid is :func:`logsnr_grid` (uniform in log-SNR unless ``grid="t"``); captions
    are encoded once, not per step. ``callback`` is handed to the sampler, which calls it once
    per step (see :data:`~vermeer_core.interfaces.SamplerCallback`). The model's train/eval
    mode is the caller's business.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not captions:
        raise ValueError("sample() needs at least one caption")
    logsnrs = logsnr_grid(schedule, resolution, steps, grid=grid, device=device)
    text_cond = model.encode_text(list(captions))
    text_uncond = model.encode_text([""]) if guidance != 1.0 else None
    denoise = guided_denoiser(model, text_cond, text_uncond, prediction=prediction, guidance=guidance)
    noise = _randn((len(captions), channels, resolution, resolution), generator, device)
    if callback is None:
        # Passed only when asked for, so a third-party sampler without the argument still works.
        out = sampler.sample(denoise, noise, logsnrs, generator)
    else:
        out = sampler.sample(denoise, noise, logsnrs, generator, callback=callback)
    return out.clamp(-1.0, 1.0)
