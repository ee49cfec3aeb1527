"""Block family ``resblock``: conditioned convolutional ResBlocks, 2x down/up sampling stages
with U-Net skips, and the pixel stem/head around them.

The residual block follows the conditioned ResBlock of Dhariwal & Nichol (2021, "Diffusion
Models Beat GANs", ``use_scale_shift_norm``): GroupNorm-SiLU-Conv3x3, then a second GroupNorm
whose output is modulated by a scale and shift predicted from the conditioning vector,
SiLU-dropout-Conv3x3. The second conv starts at zero, so a fresh block is the identity and a
freshly grown stage does not disturb the signal passing through it.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from vermeer_core.api import ComponentConfig, hookimpl, Registry

__all__ = [
    "Decoder",
    "Encoder",
    "Head",
    "ResBlock",
    "ResBlockConfig",
    "ResBlockFamily",
    "build_resblock",
    "group_count",
    "vermeer_register",
]


class ResBlockConfig(ComponentConfig):
    num_res_blocks: int = Field(2, ge=1, description="residual blocks per encoder/decoder stage")
    groups: int = Field(
        32, gt=0, description="GroupNorm groups (lowered to the largest divisor of the channel count)"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before each block's second conv")

    def smoke(self) -> ResBlockConfig:
        return self.model_copy(update={"num_res_blocks": 1})


def group_count(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups`` (GroupNorm needs one)."""
    return next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)


def _zero(module: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """Conditioned residual block (Dhariwal & Nichol 2021, scale-shift norm); identity at init."""

    def __init__(self, ch: int, cond_dim: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        g = group_count(ch, groups)
        self.norm1 = nn.GroupNorm(g, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        # One fused Linear gives both scale and shift.
        self.cond_proj = nn.Linear(cond_dim, 2 * ch)
        self.norm2 = nn.GroupNorm(g, ch)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        scale, shift = self.cond_proj(self.act(cond))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(self.dropout(self.act(h)))


class Encoder(nn.Module):
    """ResBlocks at one resolution, then a stride-2 3x3 conv to half size and ``out_ch``."""

    def __init__(self, ch: int, out_ch: int, cond_dim: int, config: ResBlockConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(ch, cond_dim, config.groups, config.dropout) for _ in range(config.num_res_blocks)
        )
        self.down = nn.Conv2d(ch, out_ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        for block in self.blocks:
            x = block(x, cond)
        return x, self.down(x)


class Decoder(nn.Module):
    """Nearest 2x upsample + 3x3 conv to ``ch``; the skip is concatenated and fused back to
    ``ch`` by a 1x1 conv (concatenation lets skip and upsampled widths differ); ResBlocks."""

    def __init__(self, in_ch: int, skip_ch: int, ch: int, cond_dim: int, config: ResBlockConfig) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.up = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.fuse = nn.Conv2d(ch + skip_ch, ch, 1)
        self.blocks = nn.ModuleList(
            ResBlock(ch, cond_dim, config.groups, config.dropout) for _ in range(config.num_res_blocks)
        )

    def forward(self, x: Tensor, skip: Tensor, cond: Tensor) -> Tensor:
        h = self.up(self.upsample(x))
        h = self.fuse(torch.cat((h, skip), dim=1))
        for block in self.blocks:
            h = block(h, cond)
        return h


class Head(nn.Module):
    """GroupNorm-SiLU, then a 3x3 conv to RGB (factor 1) or a 1x1 conv to ``3*factor^2``
    channels followed by pixel shuffle (the inverse of a patchify stem); zero-initialised."""

    def __init__(self, in_ch: int, factor: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(group_count(in_ch, groups), in_ch)
        self.act = nn.SiLU()
        if factor == 1:
            self.proj = _zero(nn.Conv2d(in_ch, 3, 3, padding=1))
        else:
            self.proj = _zero(nn.Conv2d(in_ch, 3 * factor * factor, 1))
        self.shuffle = nn.PixelShuffle(factor) if factor > 1 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(self.proj(self.act(self.norm(x))))


class ResBlockFamily:
    """The ``resblock`` :class:`~vermeer_core.interfaces.BlockFamily`."""

    def __init__(self, config: ResBlockConfig) -> None:
        self.config = config

    def stem(self, out_ch: int, factor: int) -> nn.Module:
        _check_factor(factor)
        if factor == 1:
            return nn.Conv2d(3, out_ch, 3, padding=1)
        # Patchify: each factor x factor pixel patch becomes one position of the feature map.
        return nn.Conv2d(3, out_ch, factor, stride=factor)

    def head(self, in_ch: int, factor: int) -> nn.Module:
        _check_factor(factor)
        return Head(in_ch, factor, self.config.groups)

    def resblock(self, ch: int, cond_dim: int) -> nn.Module:
        return ResBlock(ch, cond_dim, self.config.groups, self.config.dropout)

    def encoder(self, ch: int, out_ch: int, cond_dim: int) -> nn.Module:
        return Encoder(ch, out_ch, cond_dim, self.config)

    def decoder(self, in_ch: int, skip_ch: int, ch: int, cond_dim: int) -> nn.Module:
        return Decoder(in_ch, skip_ch, ch, cond_dim, self.config)


def _check_factor(factor: int) -> None:
    if factor < 1:
        raise ValueError(f"stem/head factor must be a positive integer, got {factor}")


def build_resblock(config: ResBlockConfig) -> ResBlockFamily:
    return ResBlockFamily(config)


@hookimpl
def vermeer_register(registry: Registry) -> None:
    registry.add("block", "resblock", build_resblock, ResBlockConfig)
