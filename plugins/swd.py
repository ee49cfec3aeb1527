"""metric ``swd``: sliced Wasserstein distance between Laplacian-pyramid patches of generated
and reference images.

The measure of Karras et al. 2018 ("Progressive Growing of GANs for Improved Quality,
Stability, and Variation", ICLR 2018, Sec. 5 and Appendix D), written from the paper's
description: each image is decomposed into a Laplacian pyramid (5-tap binomial filter, 2x
steps, down to 16x16); from every level, ``patches_per_image`` random 7x7 neighbourhoods are
taken as 147-d descriptors; each level's descriptors are normalised per colour channel (mean
and std over that set), and the distance between the two sets is the sliced Wasserstein
distance: the mean over random unit directions of the 1-D Wasserstein-1 distance between the
sorted projections. Finer levels measure detail, coarser ones layout and colour. Reported in
units of 10^-3, as in the paper's tables; ``swd/<R>`` per level (R = that level's side) and
``swd`` = their mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor


from vermeer_core.api import ComponentConfig, EvalPrompt, hookimpl

__all__ = ["SWDConfig", "SWDMetric", "laplacian_pyramid", "sliced_wasserstein", "vermeer_register"]

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


class SWDConfig(ComponentConfig):
    """Sampling sizes of the estimate; the paper's values are 128 patches per image, 4 x 128
    directions, 7x7 patches, levels down to 16x16."""

    patch: int = Field(7, ge=1, description="side of a patch (a neighbourhood descriptor)")
    patches_per_image: int = Field(128, gt=0, description="random patches taken per image and level")
    directions: int = Field(512, gt=0, description="random projection directions")
    min_resolution: int = Field(16, ge=8, description="coarsest pyramid level")
    seed: int = Field(0, description="patch positions and directions (same for both sets)")


def _blur(x: Tensor) -> Tensor:
    """Separable 5-tap binomial blur, reflect-padded, per channel."""
    c = x.shape[1]
    k = _BINOMIAL.to(x)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def laplacian_pyramid(x: Tensor, min_resolution: int = 16) -> list[Tensor]:
    """Levels of the Laplacian pyramid of ``x`` (B, C, R, R), finest first: each level is the
    image minus the 2x up-sampled blur-and-decimate of it; the last level is the low-pass
    residual at ``min_resolution`` (or the image itself when it is no larger)."""
    levels = []
    while x.shape[-1] > min_resolution:
        low = _blur(x)[..., ::2, ::2]
        up = torch.zeros_like(x)
        up[..., ::2, ::2] = low
        levels.append(x - 4.0 * _blur(up))  # zero-insertion upsample: 4x gain restores the mean
        x = low
    levels.append(x)
    return levels


def sliced_wasserstein(a: Tensor, b: Tensor, directions: int, generator: torch.Generator) -> float:
    """Sliced Wasserstein-1 distance between point sets ``a`` and ``b`` (N, D), same N: the
    mean over ``directions`` random unit vectors of the mean absolute difference of the
    sorted projections."""
    d = torch.randn(a.shape[1], directions, generator=generator, dtype=torch.float64)
    d /= d.norm(dim=0, keepdim=True)
    pa = torch.sort(a.double() @ d, dim=0).values
    pb = torch.sort(b.double() @ d, dim=0).values
    return float((pa - pb).abs().mean())


class SWDMetric:
    """Collects patch descriptors of generated and reference images per pyramid level; the
    same patch positions are used for both sets (so identical sets score exactly 0)."""

    needs_references = True

    def __init__(self, config: SWDConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self._fake: dict[int, list[Tensor]] = {}
        self._real: dict[int, list[Tensor]] = {}
        self._gen = torch.Generator().manual_seed(self.config.seed)

    def _patches(self, level: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
        p = self.config.patch
        windows = level.unfold(2, p, 1).unfold(3, p, 1)  # (B, C, H-p+1, W-p+1, p, p)
        b = torch.arange(level.shape[0])[:, None]
        return windows.permute(0, 2, 3, 1, 4, 5)[b, ys, xs].flatten(2).flatten(0, 1)  # (B*n, C*p*p)

    def update(
        self, images: Tensor, prompts: Sequence[EvalPrompt], references: Tensor | None = None
    ) -> None:
        if references is None or references.shape != images.shape:
            got = None if references is None else tuple(references.shape)
            raise ValueError(f"swd: needs reference images of shape {tuple(images.shape)}, got {got}")
        c = self.config
        fakes = laplacian_pyramid(images.detach().float().cpu(), c.min_resolution)
        reals = laplacian_pyramid(references.detach().float().cpu(), c.min_resolution)
        for fake, real in zip(fakes, reals):
            side = fake.shape[-1]
            span = side - min(c.patch, side) + 1
            if c.patch > side:
                raise ValueError(f"swd: patch {c.patch} is larger than the pyramid level {side}x{side}")
            shape = (fake.shape[0], c.patches_per_image)
            ys = torch.randint(span, shape, generator=self._gen)
            xs = torch.randint(span, shape, generator=self._gen)
            self._fake.setdefault(side, []).append(self._patches(fake, ys, xs))
            self._real.setdefault(side, []).append(self._patches(real, ys, xs))
        return None

    def compute(self) -> dict[str, float]:
        if not self._fake:
            raise ValueError("swd: no images were seen")
        out: dict[str, float] = {}
        gen = torch.Generator().manual_seed(self.config.seed + 1)
        for side in sorted(self._fake, reverse=True):
            a, b = (_normalise(torch.cat(s[side]), self.config.patch) for s in (self._fake, self._real))
            out[f"swd/{side}"] = 1e3 * sliced_wasserstein(a, b, self.config.directions, gen)
        out["swd"] = sum(out.values()) / len(out)
        return out


def _normalise(desc: Tensor, patch: int) -> Tensor:
    """Per colour channel: zero mean, unit std over all of a set's descriptors (Karras et al.)."""
    d = desc.double().view(desc.shape[0], -1, patch * patch)
    d = d - d.mean(dim=(0, 2), keepdim=True)
    d = d / d.std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
    return d.flatten(1)


def build_swd(config: SWDConfig, *, device: Any = None) -> SWDMetric:
    """Factory of metric ``swd`` (computed on the CPU)."""
    return SWDMetric(config)


@hookimpl
def vermeer_register(registry: Any) -> None:
    registry.add("metric", "swd", build_swd, SWDConfig)
