"""text_encoder ``tiny``: a small trainable transformer over bytes or hashed words; nothing to
download.

Captions become tokens framed by BOS/EOS, so every caption -- the empty one used as the
unconditional input of classifier-free guidance included -- has at least two real tokens.
``tokens: bytes`` (the default) reads UTF-8 bytes: any text, but a word's meaning must be
assembled from its letters by attention first. ``tokens: words`` gives each lower-cased word
(or punctuation mark) one id by hashing it (CRC-32) into ``word_buckets`` buckets -- the
hashing trick (Weinberger et al. 2009), so no vocabulary file -- and a word's embedding is its
meaning from the first step: on the synthetic captions a core learns colour and shape several
times faster per image (see benchmarks/learning_study.py).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from vermeer_core.api import ComponentConfig, hookimpl, TextEmbedding

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "VOCAB",
    "TinyTextConfig",
    "TinyTextEncoder",
    "build_tiny",
    "tokenize",
    "tokenize_words",
    "vermeer_register",
]

PAD, BOS, EOS = 256, 257, 258  # after the 256 byte values
VOCAB = 259


class TinyTextConfig(ComponentConfig):
    """Size of the byte-level text encoder."""

    dim: int = Field(256, gt=0, description="width of the token embeddings it outputs")
    depth: int = Field(2, ge=0, description="number of transformer layers")
    heads: int = Field(4, gt=0, description="attention heads; must divide dim")
    max_tokens: int = Field(
        64,
        ge=3,
        description="longest token sequence, BOS and EOS included; longer captions lose their trailing bytes",
    )
    mlp_ratio: float = Field(4.0, gt=0, description="hidden width of each MLP as a multiple of dim")
    tokens: Literal["bytes", "words"] = Field(
        "bytes", description="'bytes' (UTF-8 bytes) or 'words' (lower-cased words hashed into word_buckets ids)"
    )
    word_buckets: int = Field(
        4096, ge=16, description="hash buckets of tokens: words (distinct words may share one; rarer as it grows)"
    )

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> TinyTextConfig:
        if self.dim % self.heads:
            raise ValueError(
                f"dim ({self.dim}) must be a multiple of heads ({self.heads}); change one of them"
            )
        return self

    def smoke(self) -> TinyTextConfig:
        return self.model_copy(update={"dim": 32, "depth": 1, "heads": 2})


def tokenize(captions: Sequence[str], max_tokens: int) -> tuple[Tensor, Tensor]:
    """Byte tokens ``[BOS, bytes..., EOS, PAD...]`` padded to the longest caption of the batch.

    A caption longer than ``max_tokens - 2`` UTF-8 bytes keeps its first ``max_tokens - 2``
    bytes (possibly cutting a multi-byte character; the model sees bytes) and still ends in
    EOS. Returns (ids (B, L) int64, mask (B, L) bool, True = real token), on the CPU.
    """
    if isinstance(captions, str):
        raise TypeError("tokenize expects a sequence of captions, not one string; wrap it in a list")
    encoded = [c.encode("utf-8")[: max_tokens - 2] for c in captions]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    width = int(lengths.max(initial=0)) + 2
    ids = np.full((len(encoded), width), PAD, dtype=np.int64)
    # Scatter every byte of the batch at once: caption b's j-th byte goes to (b, 1 + j).
    flat = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    rows = np.repeat(np.arange(len(encoded)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1
    ids[rows, cols] = flat
    ids[:, 0] = BOS
    ids[np.arange(len(encoded)), lengths + 1] = EOS
    mask = np.arange(width)[None, :] < (lengths + 2)[:, None]
    return torch.from_numpy(ids), torch.from_numpy(mask)


_WORD = re.compile(r"[^\W_]+|[^\w\s]", re.UNICODE)


def tokenize_words(captions: Sequence[str], max_tokens: int, buckets: int) -> tuple[Tensor, Tensor]:
    """Word tokens ``[BOS, w..., EOS, PAD...]``: each lower-cased run of letters/digits, and
    each punctuation mark, becomes ``crc32(word) % buckets``; BOS, EOS and PAD are ``buckets``,
    ``buckets + 1`` and ``buckets + 2``. Same framing, truncation and return values as
    :func:`tokenize`. CRC-32 is stable across processes and platforms (``hash`` is not)."""
    if isinstance(captions, str):
        raise TypeError("tokenize_words expects a sequence of captions, not one string; wrap it in a list")
    pad, bos, eos = buckets + 2, buckets, buckets + 1
    seqs = [
        [zlib.crc32(w.encode("utf-8")) % buckets for w in _WORD.findall(c.lower())][: max_tokens - 2]
        for c in captions
    ]
    width = max((len(q) for q in seqs), default=0) + 2
    ids = torch.full((len(seqs), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, q in enumerate(seqs):
        ids[row, : len(q) + 2] = torch.tensor([bos, *q, eos], dtype=torch.int64)
        mask[row, : len(q) + 2] = True
    return ids, mask


class _Block(nn.Module):
    """Pre-norm transformer layer: fused QKV projection, SDPA with a key padding mask."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, D)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(nn.Module):
    """Byte embedding + learned positions + pre-norm transformer layers + final norm.

    ``forward(captions) -> TextEmbedding``: ``tokens`` (B, L, dim) with padded positions set
    to zero, ``mask`` (B, L) True on real tokens, ``pooled`` the mean over real tokens.
    """

    def __init__(self, config: TinyTextConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.max_tokens = config.max_tokens
        vocab = VOCAB if config.tokens == "bytes" else config.word_buckets + 3
        self.embed = nn.Embedding(vocab, config.dim)
        self.pos = nn.Parameter(torch.zeros(config.max_tokens, config.dim))
        self.blocks = nn.ModuleList(
            _Block(config.dim, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, captions: Sequence[str]) -> TextEmbedding:
        if self.config.tokens == "words":
            ids, mask = tokenize_words(captions, self.max_tokens, self.config.word_buckets)
        else:
            ids, mask = tokenize(captions, self.max_tokens)
        device = self.embed.weight.device
        ids = ids.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        # (B, 1, 1, L): every query attends to real keys only; BOS is always real, so no row
        # is fully masked and padding never changes a real token's output.
        attn_mask = mask[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask)
        keep = mask[..., None].to(x.dtype)
        x = self.norm(x) * keep
        pooled = x.sum(1) / keep.sum(1)
        return TextEmbedding(tokens=x, mask=mask, pooled=pooled)


def build_tiny(config: TinyTextConfig) -> TinyTextEncoder:
    """Factory of text_encoder ``tiny`` (see :mod:`vermeer_core.interfaces`)."""
    return TinyTextEncoder(config)


@hookimpl
def vermeer_register(registry: Any) -> None:
    registry.add("text_encoder", "tiny", build_tiny, TinyTextConfig)
