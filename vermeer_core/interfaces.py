"""What each kind of component must provide: factory signatures and the objects they return.

Every factory is called as ``factory(config, **runtime)`` where ``config`` is the validated
instance of the pydantic model the component registered (see :mod:`vermeer_core.hookspecs`)
and ``runtime`` holds objects that are not configuration. Tensors are ``(B, C, H, W)`` images
in ``[-1, 1]`` unless stated otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from vermeer_core.model import GrowthContext, VermeerModel

__all__ = [
    "AttentionFn",
    "Batch",
    "BlockFamily",
    "DataStream",
    "Denoiser",
    "EvalPrompt",
    "GrowthPolicy",
    "Metric",
    "NoiseSchedule",
    "Phase",
    "Sampler",
    "TextEmbedding",
    "Trainable",
]


# --- text_encoder -------------------------------------------------------------------------
class TextEmbedding(NamedTuple):
    """Encoded captions. ``mask`` is True where a token is real (False = padding).

    A NamedTuple, not a dataclass: FSDP2 finds a module's output tensors (to hook its
    pre-backward all-gather) by pytree traversal, and torch releases before 2.13 do not
    traverse dataclasses — a sharded text encoder then fails in backward on freed storage.
    """

    tokens: Tensor  # (B, L, dim)
    mask: Tensor  # (B, L) bool
    pooled: Tensor  # (B, dim)


# A text_encoder factory: ``factory(config) -> nn.Module`` with an int attribute ``dim`` and
# ``forward(captions: Sequence[str]) -> TextEmbedding`` (tokenisation happens inside, on the
# module's device). The empty caption "" is the unconditional input used for CFG.


# --- attention ----------------------------------------------------------------------------
class AttentionFn(Protocol):
    """``attend(q, k, v, key_mask=None) -> out``; all of layout (B, S, H, D) (xformers' layout;
    SDPA's (B, H, S, D) is a free transpose view of it). ``key_mask`` is (B, Sk) bool, True =
    attend. Returns (B, Sq, H, D)."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor: ...


# An attention factory: ``factory(config) -> AttentionFn``.


# --- core ---------------------------------------------------------------------------------
# A core factory: ``factory(config, *, channels: int, grid: int, cond_dim: int, text_dim: int,
# attention: AttentionFn) -> nn.Module`` whose
# ``forward(x: (B, channels, grid, grid), cond: (B, cond_dim), text: TextEmbedding)``
# returns (B, channels, grid, grid). Repeated transformer blocks live in ``.blocks``
# (an nn.ModuleList) so the engine can shard/checkpoint/compile each one.


# --- block --------------------------------------------------------------------------------
@runtime_checkable
class BlockFamily(Protocol):
    """Builds the convolutional parts around the core. Every module whose forward takes
    ``cond`` gets the (B, cond_dim) time+text embedding."""

    def stem(self, out_ch: int, factor: int) -> nn.Module:
        """Pixels (B,3,R,R) -> (B,out_ch,R/factor,R/factor)."""

    def head(self, in_ch: int, factor: int) -> nn.Module:
        """(B,in_ch,R/factor,R/factor) -> pixels (B,3,R,R) (zero-initialised last layer)."""

    def resblock(self, ch: int, cond_dim: int) -> nn.Module:
        """``forward(x, cond)``: one residual block, shape preserving."""

    def encoder(self, ch: int, out_ch: int, cond_dim: int) -> nn.Module:
        """``forward(x, cond) -> (skip, down)``: residual blocks at this resolution with ``ch``
        channels (input has ``ch``), ``skip`` their output, ``down`` 2x downsampled to
        ``out_ch`` channels."""

    def decoder(self, in_ch: int, skip_ch: int, ch: int, cond_dim: int) -> nn.Module:
        """``forward(x, skip, cond)``: 2x upsample ``x`` (in_ch) to ``ch``, fuse ``skip``
        (skip_ch), residual blocks; returns (B, ch, 2h, 2w)."""


# A block factory: ``factory(config) -> BlockFamily``.


# --- noise_schedule -----------------------------------------------------------------------
@runtime_checkable
class NoiseSchedule(Protocol):
    def logsnr(self, t: Tensor, resolution: int) -> Tensor:
        """log-SNR at times ``t`` in [0, 1] for images of ``resolution``; strictly decreasing
        in t, finite at both ends (clipped)."""


# A noise_schedule factory: ``factory(config) -> NoiseSchedule``.


# --- sampler ------------------------------------------------------------------------------
class Denoiser(Protocol):
    """``denoise(x_t, logsnr) -> x0_hat``: the model's estimate of clean data at noise level
    ``logsnr`` (a (B,) tensor). Classifier-free guidance is already applied inside."""

    def __call__(self, x: Tensor, logsnr: Tensor) -> Tensor: ...


@runtime_checkable
class Sampler(Protocol):
    def sample(
        self, denoise: Denoiser, noise: Tensor, logsnrs: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Integrate from ``noise`` (pure Gaussian at ``logsnrs[0]``) along ``logsnrs`` (length
        steps+1, strictly increasing log-SNR = decreasing noise) and return the final x0
        estimate."""


# A sampler factory: ``factory(config) -> Sampler``.


# --- dataset ------------------------------------------------------------------------------
@dataclass
class Batch:
    images: Tensor  # (B, 3, R, R) float32 in [-1, 1]
    captions: list[str]


@runtime_checkable
class DataStream(Protocol):
    """An endless, resumable stream of batches for one rank."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]:
        """Position such that ``load_state_dict`` resumes with the next unseen batch."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``. At a changed world size every rank gets rank 0's state and
        maps it onto its own share as well as it can (say how in the dataset's docs)."""

    # Optional: ``stats() -> dict[str, int]``: counters (e.g. corrupt samples skipped, by
    # reason); the engine logs them in metrics.jsonl as ``data_<name>`` on every log step.
    # Optional, for evaluation (``vermeer eval``, a spec's ``eval:``):
    # ``eval_prompts(n: int, seed: int) -> list[EvalPrompt]``: n held-out prompts, the same on
    # every rank, never produced by the training stream; and
    # ``eval_references(prompts, resolution: int) -> Tensor``: their ground-truth images
    # (B, 3, R, R) in [-1, 1], the reference set of distribution metrics.


# A dataset factory: ``factory(config, *, resolution: int, batch_size: int, rank: int,
# world_size: int, seed: int) -> DataStream``; ``batch_size`` is per rank.


# --- metric -------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalPrompt:
    """A held-out prompt: its ``caption`` and, where the dataset knows it, ``scene``: the
    structured description the caption states (synthetic: a ``Scene``), for exact checkers."""

    caption: str
    scene: Any = None


@runtime_checkable
class Metric(Protocol):
    """Scores generated images, in batches, with a stateful ``reset / update / compute``
    (torchmetrics' pattern), so one API serves per-image scores (alignment with the prompt)
    and distribution distances that need every image (and a reference set) before the end.

    ``needs_references``: True when ``update`` needs ``references`` (ground-truth images of the
    same prompts, same shape as ``images``); the caller then asks the dataset for them."""

    needs_references: bool

    def reset(self) -> None:
        """Forget every image seen so far."""

    def update(
        self, images: Tensor, prompts: Sequence[EvalPrompt], references: Tensor | None = None
    ) -> list[float] | None:
        """Take a batch: ``images`` (B, 3, R, R) in [-1, 1] generated for ``prompts``
        (length B). Returns one score in [0, 1] per image (1 = the image passes) when the
        metric scores images one by one, else None."""

    def compute(self) -> dict[str, float]:
        """The metric's numbers over every image since ``reset``; keys start with the
        metric's name (``alignment``, ``alignment/colour``, ``swd``, ...)."""


# A metric factory: ``factory(config, *, device: torch.device) -> Metric``. Heavy optional
# dependencies (pretrained networks) load in the factory, with a clear error when missing.


# --- growth_policy ------------------------------------------------------------------------
Trainable = Literal["all", "new", "all-but-core"]


@dataclass(frozen=True)
class Phase:
    """A training phase of one stage: which parameters train, for how long, at what lr."""

    name: str
    steps: int
    lr_mult: float = 1.0
    trainable: Trainable = "all"


@runtime_checkable
class GrowthPolicy(Protocol):
    def grow(self, prev: VermeerModel | None, ctx: GrowthContext) -> VermeerModel:
        """Return the model for stage ``ctx.stage`` (``prev`` is None at stage 0). Must be a
        pure function of (spec, stage) given ``prev``: new weights come from torch's global
        generator, which the caller seeds from (spec.seed, stage) inside ``fork_rng``; no data.
        Reused modules keep their parameter names and tensors. Record every module created
        here in the returned model's ``new_modules``."""

    def phases(self, ctx: GrowthContext) -> list[Phase]:
        """The phases of stage ``ctx.stage``, in order."""


# A growth_policy factory: ``factory(config) -> GrowthPolicy``.

