"""What each kind of component must provide: factory signatures and the objects they return.

Every factory is called as ``factory(config, **runtime)`` where ``config`` is the validated
instance of the pydantic model the component registered (see :mod:`vermeer_core.hookspecs`)
and ``runtime`` holds objects that are not configuration. Tensors are ``(B, C, H, W)`` images
in ``[-1, 1]`` unless stated otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, Union, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from vermeer_core.model import GrowthContext, VermeerModel

__all__ = [
    "AttentionFactory",
    "AttentionFn",
    "BlockFactory",
    "CoreFactory",
    "DatasetFactory",
    "GrowthPolicyFactory",
    "NoiseScheduleFactory",
    "ParamMatch",
    "SamplerFactory",
    "TextEncoderFactory",
    "Batch",
    "BlockFamily",
    "DataStream",
    "Denoiser",
    "EvalPrompt",
    "GrowthPolicy",
    "Metric",
    "NoiseSchedule",
    "Phase",
    "Preconditioning",
    "Sampler",
    "SamplerCallback",
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


# A text_encoder factory: see :class:`TextEncoderFactory` below.


# --- attention ----------------------------------------------------------------------------
class AttentionFn(Protocol):
    """``attend(q, k, v, key_mask=None) -> out``; all of layout (B, S, H, D) (xformers' layout;
    SDPA's (B, H, S, D) is a free transpose view of it). ``key_mask`` is (B, Sk) bool, True =
    attend. Returns (B, Sq, H, D)."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor: ...


# An attention factory: ``factory(config) -> AttentionFn``.


# --- core ---------------------------------------------------------------------------------
# A core factory: see :class:`CoreFactory` below.


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


# A block factory: see :class:`BlockFactory` below.


# --- noise_schedule -----------------------------------------------------------------------
@runtime_checkable
class NoiseSchedule(Protocol):
    def logsnr(self, t: Tensor, resolution: int) -> Tensor:
        """log-SNR at times ``t`` in [0, 1] for images of ``resolution``; strictly decreasing
        in t, finite at both ends (clipped)."""


# A noise_schedule factory: see :class:`NoiseScheduleFactory` below.


# --- sampler ------------------------------------------------------------------------------
class Denoiser(Protocol):
    """``denoise(x_t, logsnr) -> x0_hat``: the model's estimate of clean data at noise level
    ``logsnr`` (a (B,) tensor). Classifier-free guidance is already applied inside."""

    def __call__(self, x: Tensor, logsnr: Tensor) -> Tensor: ...


#: Per-step observer of a sampler (k-diffusion's pattern): called once per step ``i`` in
#: ``0 .. steps-1``, before the step moves ``x``, with a dict holding ``"x"`` (the current
#: x_t), ``"i"``, ``"logsnr"`` (the grid's scalar level of ``x``, a 0-d tensor) and
#: ``"denoised"`` (the denoiser's x0 estimate there). For progress bars and previews; it must
#: not modify the tensors.
SamplerCallback = Callable[[dict[str, Any]], None]


@runtime_checkable
class Sampler(Protocol):
    def sample(
        self,
        denoise: Denoiser,
        noise: Tensor,
        logsnrs: Tensor,
        generator: torch.Generator | None = None,
        callback: SamplerCallback | None = None,
    ) -> Tensor:
        """Integrate from ``noise`` (pure Gaussian at ``logsnrs[0]``) along ``logsnrs`` (length
        steps+1, strictly increasing log-SNR = decreasing noise) and return the final x0
        estimate, calling ``callback`` (if given) once per step. Draw fresh noise with
        ``noise_like(x, generator)`` only: under sharded sampling ``generator`` is a
        ``BatchRows`` that gives each rank's images their rows of the whole batch's noise."""


# A sampler factory: see :class:`SamplerFactory` below.


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


# A dataset factory: see :class:`DatasetFactory` below.


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
@dataclass(frozen=True)
class ParamMatch:
    """One entry of a phase's ``trainable`` list: the parameters ``match`` selects train at
    ``lr_mult`` x the phase's lr, as one optimizer param group named ``name`` (logged as
    ``lr/<name>`` in metrics.jsonl; default: ``match`` itself).

    ``match`` is a named alias (``all``, ``new``, ``all-but-core``: see
    :data:`vermeer_core.phases.ALIASES`) or a glob over stable parameter names
    (``fnmatch`` syntax: ``core.blocks.[6-7].*``); a glob also matches every parameter under
    a module it names (``core.blocks.7`` = ``core.blocks.7.*``). A parameter belongs to the
    FIRST entry that matches it, so ``[{match: core.blocks.7, lr_mult: 0.1}, all]`` trains the
    last block at 0.1x and everything else at 1x.
    """

    match: str
    lr_mult: float = 1.0
    name: str | None = None

    @property
    def group(self) -> str:
        return self.name or self.match


#: What a phase trains: one alias or glob, or a sequence of them / of :class:`ParamMatch`
#: (first match wins; each entry becomes one optimizer param group).
Trainable = Union[str, Sequence[Union[str, ParamMatch]]]


@dataclass(frozen=True)
class Phase:
    """A training phase of one stage: which parameters train, for how long, at what lr.

    ``lr_mult`` scales ``optim.lr`` for the whole phase; a :class:`ParamMatch` entry's own
    ``lr_mult`` scales it again for its group. Use a tuple (not a list) for ``trainable`` so
    the phase stays hashable.
    """

    name: str
    steps: int
    lr_mult: float = 1.0
    trainable: Trainable = "all"


@runtime_checkable
class Preconditioning(Protocol):
    """An optional wrapper around a :class:`~vermeer_core.model.VermeerModel`'s network, set by a
    growth policy as ``model.precondition`` (EDM's preconditioning, Karras et al. 2022, §5:
    ``D(x) = c_skip x + c_out F(c_in x)``, in the spec's prediction space).

    The model runs its network ``F`` on ``scale_input(x_t, logsnr)`` and returns
    ``combine(x_t, logsnr, F(...))``: a prediction of the spec's kind (``v`` or ``eps``) for
    ``x_t`` at ``logsnr``, which the loss and the samplers use unchanged. Both must be pure
    functions of their arguments (the module holds no trained state: nothing of it is
    checkpointed), so that a model rebuilt by ``replay`` computes what the trained one did.
    """

    def scale_input(self, x_t: Tensor, logsnr: Tensor) -> Tensor: ...

    def combine(self, x_t: Tensor, logsnr: Tensor, out: Tensor) -> Tensor: ...


@runtime_checkable
class GrowthPolicy(Protocol):
    """How a model becomes the next stage's model, and the stage's training phases.

    **What ``prev`` holds.** ``prev`` is the previous stage's model as *structure only*:
    module tree, parameter names, shapes and dtypes, never trained values. At run time (and in
    ``vermeer plan``/``validate``) the engine rebuilds it with
    :func:`vermeer_core.model.replay`, whose tensors live on the ``meta`` device (or, for a
    component that cannot be built there, are freshly initialised on the CPU): reading
    ``prev``'s values gives an error or an untrained initialisation, never the trained
    weights. In a unit test that grows from a model you trained in-process, ``prev`` does
    hold values, so a policy that copies them passes its test and then trains from nothing
    in a real run: do not read values from ``prev``; declare transfers.

    **Reuse.** A module of ``prev`` placed in the new model *as the same object* keeps its
    parameter names and the engine loads its trained tensors, EMA and optimizer state by
    name. Every module created here is recorded in the returned model's ``new_modules``
    (dotted prefixes): that is what the phase alias ``new`` trains, whether or not it is
    warm-started. Do not deep-copy modules of ``prev`` into new positions: a copy holds no
    trained values (a new module whose tensors are on ``meta`` is refused).

    **Transfers: trained values into new tensors.** Record them on the returned model::

        model.transfers["core.blocks.1"] = "core.blocks.0"      # module prefix -> prefix
        model.transfers["stem.proj.weight"] = "stem.proj.weight" # tensor -> tensor
        model.transfers["head.proj.weight"] = Transfer(lambda a, b: (a + b) / 2,
                                                       ("head.proj.weight", "shallow_out.x.weight"))

    Keys name tensors (or module prefixes) of the NEW model, values tensors (prefixes) of
    ``prev``'s names, including modules the new stage discards (e.g. the Shallow-UViT
    periphery). A more specific key wins over a prefix that covers it. After the new model
    is sharded and its reused tensors are loaded, the engine sets, for each target:

    * the weight to the trained source (or ``fn`` of the full trained sources);
    * the EMA shadow to the source's shadow (or ``fn`` of the shadows), with its EMA age;
    * the AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``) to a copy of the source's; for
      a ``Transfer`` with ``fn`` the moments start fresh unless ``moments=True`` (then ``fn``
      is applied to each moment and ``step`` is the sources' largest: right for a copy,
      slice or permutation, wrong for a mix). A source that never trained gives no state.

    A transfer may also target a reused tensor (its carried value is replaced). A target or
    source that does not exist, or a shape mismatch, fails before any training (and in
    ``vermeer validate``/``plan``) with a message naming both tensors. Transfers apply when
    the stage starts from the previous stage; a resume inside the stage loads the
    transferred tensors from the checkpoint like any other, so resume stays exact.
    """

    def grow(self, prev: VermeerModel | None, ctx: GrowthContext) -> VermeerModel:
        """Return the model for stage ``ctx.stage`` (``prev`` is None at stage 0: it has no
        transfers). Must be a pure function of (spec, stage) given ``prev``'s structure: new
        weights come from torch's global generator, which the caller seeds from
        (spec.seed, stage) inside ``fork_rng``; no data. Reused modules keep their parameter
        names. Record every module created here in the returned model's ``new_modules`` and
        every warm start in its ``transfers``."""

    def phases(self, ctx: GrowthContext) -> list[Phase]:
        """The phases of stage ``ctx.stage``, in order."""


# --- factories: what ``registry.add(kind, name, factory, config)`` takes ------------------
# ``config`` is the validated instance of the config model the component registered (typed
# ``Any`` here because each factory takes its own ComponentConfig subclass).
class CoreFactory(Protocol):
    """``core``: an ``nn.Module`` with ``forward(x (B, channels, grid, grid), cond
    (B, cond_dim), text: TextEmbedding) -> (B, channels, grid, grid)``; repeated transformer
    blocks in ``.blocks`` (an ``nn.ModuleList``) so the engine can shard, checkpoint and
    compile each one. With a ``reset_parameters()`` that initialises every parameter of the
    core (writes to ``meta`` tensors are no-ops) and no buffers, the engine builds it on
    ``meta`` and initialises it one block at a time after sharding, so no rank holds a full
    copy (vermeer_core.core_init); otherwise every rank builds it in full first."""

    def __call__(
        self, config: Any, /, *, channels: int, grid: int, cond_dim: int, text_dim: int, attention: AttentionFn
    ) -> nn.Module: ...


class BlockFactory(Protocol):
    """``block``: the family of convolutional parts around the core."""

    def __call__(self, config: Any, /) -> BlockFamily: ...


class TextEncoderFactory(Protocol):
    """``text_encoder``: an ``nn.Module`` with an int attribute ``dim`` and
    ``forward(captions: Sequence[str]) -> TextEmbedding`` (tokenises on its own device; ""
    is the unconditional input for CFG)."""

    def __call__(self, config: Any, /) -> nn.Module: ...


class AttentionFactory(Protocol):
    """``attention``: an attention kernel."""

    def __call__(self, config: Any, /) -> AttentionFn: ...


class NoiseScheduleFactory(Protocol):
    """``noise_schedule``."""

    def __call__(self, config: Any, /) -> NoiseSchedule: ...


class SamplerFactory(Protocol):
    """``sampler``."""

    def __call__(self, config: Any, /) -> Sampler: ...


class DatasetFactory(Protocol):
    """``dataset``: one rank's stream; ``batch_size`` is per rank."""

    def __call__(
        self, config: Any, /, *, resolution: int, batch_size: int, rank: int, world_size: int, seed: int
    ) -> DataStream: ...


class GrowthPolicyFactory(Protocol):
    """``growth_policy``."""

    def __call__(self, config: Any, /) -> GrowthPolicy: ...
