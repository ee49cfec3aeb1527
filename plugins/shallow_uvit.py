"""The ``shallow-uvit`` core: the transformer stack on the GxG grid of a Shallow-UViT.

The core of Vermeer (arXiv 2405.16759): tokens are the G*G grid positions, each block is
pre-norm self-attention, cross-attention to the caption tokens and an MLP, each modulated by
the (B, cond_dim) time+text embedding with adaLN shift/scale/gate (DiT, Peebles & Xie 2023).

Choices made here (and why):
* Positions: a *learned* embedding initialised to the fixed 2D sin-cos table (MAE, He et al.
  2022) - a good start, yet it adapts; it is a parameter, so it is saved with the core.
* Start as identity: every block's modulation linear and the final ``out_proj`` are
  zero-initialised, and the core adds its output to its input, so a fresh core returns
  ``x`` exactly. The periphery then trains through the core from the first step.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from vermeer_core.api import AttentionFn, ComponentConfig, hookimpl, Registry, TextEmbedding

__all__ = [
    "Block",
    "CrossAttention",
    "MLP",
    "SelfAttention",
    "ShallowUViTConfig",
    "ShallowUViTCore",
    "build_shallow_uvit",
    "modulate",
    "sincos_2d",
    "vermeer_register",
]


class ShallowUViTConfig(ComponentConfig):
    width: int = Field(512, gt=0, description="model dimension of the core's tokens")
    depth: int = Field(8, gt=0, description="number of transformer blocks")
    heads: int = Field(8, gt=0, description="attention heads; must divide width")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width as a multiple of width")
    qk_norm: bool = Field(True, description="RMS-normalise queries and keys per head (stabilises training)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on residual branches and MLP hidden")
    gate_init: float = Field(
        0.0,
        description="initial adaLN gate of every residual branch (bias of the gate outputs); 0 = "
        "adaLN-Zero (DiT); the core stays the identity at init either way (zero out_proj)",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ShallowUViTConfig:
        if self.width % self.heads:
            raise ValueError(
                f"width ({self.width}) must be divisible by heads ({self.heads}); "
                f"change width to a multiple of {self.heads} or heads to a divisor of {self.width}"
            )
        return self

    def smoke(self) -> ShallowUViTConfig:
        return self.model_copy(update={"width": 32, "depth": 1, "heads": 2})


def sincos_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2D sine-cosine position table (G*G, dim): 1D sin-cos of Vaswani et al. (2017) on
    each axis, half the channels each (as in MAE, He et al. 2022)."""
    quarter = -(-dim // 4)
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    axis = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        angles = pos[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)[:, :dim].float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation of DiT (Peebles & Xie, 2023): ``x * (1 + scale) + shift``."""
    return torch.addcmul(shift, x, 1 + scale)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose gain follows the input's dtype: under autocast the activations are
    bf16 while parameters stay fp32, and torch's fused kernel needs both in one dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def _qk_norm(head_dim: int, enabled: bool) -> nn.Module:
    return RMSNorm(head_dim) if enabled else nn.Identity()


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, width: int, heads: int, qk_norm: bool, attention: AttentionFn) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = _qk_norm(width // heads, qk_norm)
        self.k_norm = _qk_norm(width // heads, qk_norm)
        self.proj = nn.Linear(width, width)
        self.attention = attention

    def forward(self, x: Tensor) -> Tensor:
        b, s, w = x.shape
        # (B,S,3W) -> (B,S,3,H,D) is a view; unbind gives (B,S,H,D) views with no copy.
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, w // self.heads).unbind(2)
        out = self.attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.reshape(b, s, w))


class CrossAttention(nn.Module):
    """Queries from the grid tokens, keys/values (one fused projection) from the text tokens."""

    def __init__(self, width: int, heads: int, qk_norm: bool, attention: AttentionFn) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.q_norm = _qk_norm(width // heads, qk_norm)
        self.k_norm = _qk_norm(width // heads, qk_norm)
        self.proj = nn.Linear(width, width)
        self.attention = attention

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        b, s, w = x.shape
        d = w // self.heads
        q = self.q(x).view(b, s, self.heads, d)
        k, v = self.kv(text).view(b, text.shape[1], 2, self.heads, d).unbind(2)
        out = self.attention(self.q_norm(q), self.k_norm(k), v, text_mask)
        return self.proj(out.reshape(b, s, w))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, MLP; each residual branch
    modulated (shift, scale) and gated by ``ada(silu(cond))``, zero-initialised."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, dropout: float,
                 cond_dim: int, attention: AttentionFn) -> None:
        super().__init__()
        # Norms carry no affine parameters: the modulation supplies scale and shift.
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads, qk_norm, attention)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.cross = CrossAttention(width, heads, qk_norm, attention)
        self.norm3 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio), dropout)
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Linear(cond_dim, 9 * width)

    def forward(self, x: Tensor, cond: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """``cond`` is already ``silu(cond)`` (computed once by the core, not per block)."""
        (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate,
         mlp_shift, mlp_scale, mlp_gate) = self.ada(cond)[:, None, :].chunk(9, dim=-1)
        x = x + sa_gate * self.drop(self.attn(modulate(self.norm1(x), sa_shift, sa_scale)))
        x = x + ca_gate * self.drop(self.cross(modulate(self.norm2(x), ca_shift, ca_scale), text, text_mask))
        return x + mlp_gate * self.drop(self.mlp(modulate(self.norm3(x), mlp_shift, mlp_scale)))


class ShallowUViTCore(nn.Module):
    """(B, channels, G, G) -> (B, channels, G, G): ``x + out_proj(blocks(in_proj(x) + pos))``."""

    def __init__(self, config: ShallowUViTConfig, *, channels: int, grid: int, cond_dim: int,
                 text_dim: int, attention: AttentionFn) -> None:
        super().__init__()
        width = config.width
        self.channels, self.grid, self.width = channels, grid, width
        self.gate_init = config.gate_init
        self.in_proj = nn.Linear(channels, width)  # a 1x1 convolution on the G*G tokens
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid, width))
        self.text_proj = nn.Linear(text_dim, width)
        self.text_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(
            Block(width, config.heads, config.mlp_ratio, config.qk_norm, config.dropout, cond_dim, attention)
            for _ in range(config.depth)
        )
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(cond_dim, 2 * width)
        self.out_proj = nn.Linear(width, channels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every parameter; callable after materialising from the meta device."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
                module.reset_parameters()
        self.pos_embed.copy_(sincos_2d(self.grid, self.width)[None])
        # Zero modulation (gates = 0) makes every block the identity; zero out_proj makes the
        # whole core the identity, since its output is added to its input.
        for linear in [block.ada for block in self.blocks] + [self.final_ada, self.out_proj]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        if self.gate_init:
            # ada's chunks are (shift, scale, gate) x (self-attn, cross-attn, MLP)
            w = self.width
            for block in self.blocks:
                for k in (2, 5, 8):
                    block.ada.bias[k * w : (k + 1) * w] = self.gate_init

    def forward(self, x: Tensor, cond: Tensor, text: TextEmbedding) -> Tensor:
        b, c, h, w = x.shape
        if (c, h, w) != (self.channels, self.grid, self.grid):
            raise ValueError(
                f"core input has shape (C, H, W) = {(c, h, w)} but the core was built for "
                f"{(self.channels, self.grid, self.grid)}; check the stem's channels and the grid size"
            )
        tokens = self.in_proj(x.flatten(2).transpose(1, 2)) + self.pos_embed
        cond = F.silu(cond)
        # a frozen encoder may hand over bf16 tokens to an fp32 core
        ctx = self.text_norm(self.text_proj(text.tokens.to(self.text_proj.weight.dtype)))
        for block in self.blocks:
            tokens = block(tokens, cond, ctx, text.mask)
        shift, scale = self.final_ada(cond)[:, None, :].chunk(2, dim=-1)
        out = self.out_proj(modulate(self.final_norm(tokens), shift, scale))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def build_shallow_uvit(config: ShallowUViTConfig, *, channels: int, grid: int, cond_dim: int,
                       text_dim: int, attention: AttentionFn) -> ShallowUViTCore:
    return ShallowUViTCore(config, channels=channels, grid=grid, cond_dim=cond_dim,
                           text_dim=text_dim, attention=attention)


@hookimpl
def vermeer_register(registry: Registry) -> None:
    registry.add("core", "shallow-uvit", build_shallow_uvit, ShallowUViTConfig)
