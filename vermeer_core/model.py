"""Model assembly and growth mechanics.

A :class:`VermeerModel` is ``stem - E_R ... E_2G - core (GxG) - D_2G ... D_R - head`` with U-Net
skips ``E_r -> D_r`` (Vermeer, arXiv 2405.16759), or, at core pretraining, the Shallow-UViT
``stem(patchify) - ResBlock - core - ResBlock - head``. The :class:`ModelBuilder` makes each
piece from the spec through the registry; growth policies use it to assemble the model of a
stage, reusing modules of the previous stage *as objects* so their parameter names and tensors
carry over unchanged. The topology of a stage is a pure function of (spec, stage):
:func:`replay` rebuilds it for resume.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vermeer_core.core_init import init_in_groups
from vermeer_core.interfaces import BlockFamily, GrowthPolicy, Phase, TextEmbedding, Trainable
from vermeer_core.phases import CORE_MODULES, ParamGroup, resolve_phase
from vermeer_core.registry import Registry
from vermeer_core.transfer import Transfer, TransferError, TransferMap, resolve_transfers

if TYPE_CHECKING:
    from vermeer_core.spec import RunSpec

__all__ = [
    "CORE_MODULES",
    "Conditioning",
    "GrowthContext",
    "ModelBuilder",
    "VermeerModel",
    "apply_phase",
    "build_stage_model",
    "DeferredCore",
    "deferring_core",
    "growth_context",
    "logsnr_fourier_features",
    "param_groups",
    "phase_groups",
    "replay",
    "select_trainable",
    "stage_phases",
    "stage_seed",
    "conditioning_offset",
    "stage_transfers",
]

@dataclass(frozen=True)
class DeferredCore:
    """A core left on meta by :meth:`ModelBuilder.core` for its caller to initialise with
    :func:`vermeer_core.core_init.init_in_groups` under ``seed``. ``tensor_ids``: its
    tensors as built (a tensor put into it later, e.g. copied from another model, is not)."""

    module: nn.Module
    seed: int
    tensor_ids: frozenset[int]


#: Set by :func:`deferring_core` while the engine builds a stage: cores built then go here.
_DEFERRED: ContextVar[list[DeferredCore] | None] = ContextVar("vermeer_deferred_cores", default=None)


@contextmanager
def deferring_core() -> Iterator[list[DeferredCore]]:
    """Within this context :meth:`ModelBuilder.core` leaves cores that define
    ``reset_parameters()`` on the meta device and lists each with its seed in the yielded
    list, for the caller to initialise after sharding with
    :func:`vermeer_core.core_init.init_in_groups` (no full copy of the core is made)."""
    built: list[DeferredCore] = []
    token = _DEFERRED.set(built)
    try:
        yield built
    finally:
        _DEFERRED.reset(token)


# Log-SNR of a clipped schedule spans roughly [-20, 20]; frequencies from 1/64 (a near-linear
# code of the whole range) to 4 rad per unit (resolves steps of a fraction of a unit).
_FOURIER_FREQS = 64
_FOURIER_MIN_LOG2, _FOURIER_MAX_LOG2 = -6.0, 2.0


def logsnr_fourier_features(logsnr: Tensor, n: int = _FOURIER_FREQS) -> Tensor:
    """Sinusoidal features ``[sin(w logsnr), cos(w logsnr)]`` at log-spaced frequencies ``w``
    (the transformer position code of Vaswani et al. 2017 applied to log-SNR): (B,) -> (B, 2n)."""
    # Computed on the fly rather than kept as a buffer: costs nothing, survives meta-device
    # construction, and is never stale in a checkpoint.
    exps = torch.linspace(_FOURIER_MIN_LOG2, _FOURIER_MAX_LOG2, n, device=logsnr.device)
    angles = logsnr.float()[:, None] * torch.exp2(exps)[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


class Conditioning(nn.Module):
    """The (B, cond_dim) conditioning vector: an MLP of log-SNR Fourier features plus a linear
    projection of the pooled text embedding."""

    def __init__(self, cond_dim: int, text_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * _FOURIER_FREQS, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )
        self.text_proj = nn.Linear(text_dim, cond_dim)

    def forward(self, logsnr: Tensor, pooled: Tensor) -> Tensor:
        first = self.mlp[0].weight
        # Under mixed precision the weights may be bf16 while log-SNR stays fp32.
        feats = logsnr_fourier_features(logsnr).to(first.dtype)
        return self.mlp(feats) + self.text_proj(pooled.to(first.dtype))


def _key(resolution: int) -> str:
    return f"r{resolution}"


class VermeerModel(nn.Module):
    """Text-to-image denoiser at one resolution: ``forward(x_t, logsnr, text) -> (B,3,R,R)``.

    Submodules: ``text``, ``cond``, ``core`` (the core group), ``stem``, ``encoders`` /
    ``decoders`` (``nn.ModuleDict`` keyed ``"r<resolution>"``: the stage that runs at that
    resolution), ``shallow_in`` / ``shallow_out`` (Shallow-UViT only, else ``None``), ``head``.
    """

    def __init__(
        self,
        *,
        resolution: int,
        grid: int,
        text: nn.Module,
        cond: nn.Module,
        core: nn.Module,
        stem: nn.Module,
        head: nn.Module,
        stem_factor: int = 1,
        encoders: Mapping[int, nn.Module] | None = None,
        decoders: Mapping[int, nn.Module] | None = None,
        shallow_in: nn.Module | None = None,
        shallow_out: nn.Module | None = None,
        new_modules: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        encoders, decoders = dict(encoders or {}), dict(decoders or {})
        if set(encoders) != set(decoders):
            raise ValueError(f"encoders {sorted(encoders)} and decoders {sorted(decoders)} must pair up")
        if resolution != grid * stem_factor * 2 ** len(encoders):
            raise ValueError(
                f"resolution {resolution} does not match grid {grid} x stem factor {stem_factor} "
                f"x 2^{len(encoders)} encoder stages"
            )
        self.resolution, self.grid, self.stem_factor = resolution, grid, stem_factor
        self.text, self.cond, self.core = text, cond, core
        self.stem = stem
        # Outermost (largest) resolution first: the order the encoders run in.
        order = sorted(encoders, reverse=True)
        self.encoders = nn.ModuleDict({_key(r): encoders[r] for r in order})
        self.add_module("shallow_in", shallow_in)
        self.add_module("shallow_out", shallow_out)
        self.decoders = nn.ModuleDict({_key(r): decoders[r] for r in order})
        self.head = head
        #: dotted module-name prefixes created at this model's last growth (what the phase
        #: alias ``new`` trains, warm-started or not)
        self.new_modules = frozenset(new_modules)
        #: warm starts from the previous stage's trained tensors, recorded by the growth
        #: policy: new name/prefix -> old name/prefix | Transfer (see vermeer_core.transfer)
        self.transfers: TransferMap = {}
        #: parameter names a component built frozen (e.g. a pretrained text encoder); no
        #: phase makes them trainable. Set by the builder.
        self.always_frozen: frozenset[str] = frozenset()
        #: added to the log-SNR the conditioning sees (never to the diffusion maths): set by
        #: :func:`build_stage_model` from ``diffusion.conditioning`` (see
        #: :func:`conditioning_offset`); 0 conditions on the input's own log-SNR
        self.logsnr_offset = 0.0
        #: run the conv stages of a grown model channels-last on CPU: oneDNN's channels-last
        #: kernels took 7-8% off the 128 px step's CPU time with an equal loss (two A/B runs of
        #: ``benchmarks/profile_step.py -r 128 --ab``; no gain at the 32 px core step; not
        #: measured on CUDA, so not used there). The input's format is what changes: FSDP2
        #: keeps the weights contiguous, and convolutions and GroupNorm follow the input.
        self.channels_last_cpu = True
        #: optional :class:`~vermeer_core.interfaces.Preconditioning` set by a growth policy:
        #: the network runs on ``scale_input(x_t, logsnr)`` and the model returns
        #: ``combine(x_t, logsnr, out)`` (e.g. ``greedy`` with ``init: inherit-denoiser``)
        self.precondition: nn.Module | None = None

    @property
    def encoder_resolutions(self) -> list[int]:
        """Resolutions of the encoder stages, outermost first."""
        return [int(k[1:]) for k in self.encoders]

    def encode_text(self, captions: list[str]) -> TextEmbedding:
        return self.text(captions)

    def forward(self, x_t: Tensor, logsnr: Tensor, text: TextEmbedding | Sequence[str]) -> Tensor:
        """Raw network output for noisy images ``x_t`` at ``logsnr``. ``text`` is an embedding
        from :meth:`encode_text` or the captions (encoded here: the training path, so that a
        sharded model runs text encoding inside its root forward)."""
        if not isinstance(text, TextEmbedding):
            text = self.text(list(text))
        if x_t.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(
                f"this stage's model takes {self.resolution}x{self.resolution} images, got "
                f"{tuple(x_t.shape[-2:])}"
            )
        if logsnr.ndim == 0:
            logsnr = logsnr.expand(x_t.shape[0])
        cond = self.cond(logsnr + self.logsnr_offset if self.logsnr_offset else logsnr, text.pooled)
        x_in = x_t if self.precondition is None else self.precondition.scale_input(x_t, logsnr)
        if self.encoders and self.channels_last_cpu and x_in.device.type == "cpu":
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        h = self.stem(x_in)
        skips: list[Tensor] = []
        for encoder in self.encoders.values():
            skip, h = encoder(h, cond)
            skips.append(skip)
        if self.shallow_in is not None:
            h = self.shallow_in(h, cond)
        h = self.core(h, cond, text)
        if self.shallow_out is not None:
            h = self.shallow_out(h, cond)
        for decoder, skip in zip(reversed(self.decoders.values()), reversed(skips)):
            h = decoder(h, skip, cond)
        out = self.head(h)
        return out if self.precondition is None else self.precondition.combine(x_t, logsnr, out)

    def topology(self) -> dict[str, Any]:
        """A plain description of the structure (for ``vermeer plan`` and tests)."""
        return {
            "kind": "unet" if self.encoders else "shallow-uvit",
            "resolution": self.resolution,
            "grid": self.grid,
            "stem_factor": self.stem_factor,
            "encoders": self.encoder_resolutions,
            "new_modules": sorted(self.new_modules),
            **({"precondition": repr(self.precondition)} if self.precondition is not None else {}),
        }


# --- parameter groups and phases -----------------------------------------------------------
def _under(name: str, prefixes: frozenset[str] | tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def param_groups(model: VermeerModel) -> dict[str, list[str]]:
    """Parameter names split into ``core`` (text, cond, core) and ``periphery`` (the rest)."""
    groups: dict[str, list[str]] = {"core": [], "periphery": []}
    for name, _ in model.named_parameters():
        groups["core" if _under(name, CORE_MODULES) else "periphery"].append(name)
    return groups


def select_trainable(model: VermeerModel, trainable: Trainable) -> set[str]:
    """Names of the parameters that train under ``trainable`` (aliases, globs or a list of
    them: see :mod:`vermeer_core.phases`)."""
    return set().union(*(g.names for g in resolve_phase(model, Phase("trainable", 1, trainable=trainable))))


def phase_groups(model: VermeerModel, phase: Phase) -> list[ParamGroup]:
    """The optimizer param groups of ``phase`` on ``model`` (see :func:`resolve_phase`)."""
    return resolve_phase(model, phase)


def apply_phase(model: VermeerModel, phase: Phase) -> set[str]:
    """Set ``requires_grad`` for ``phase`` (frozen parameters get no gradient); returns the
    trainable names."""
    chosen: set[str] = set().union(*(g.names for g in resolve_phase(model, phase)))
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return chosen


# --- building pieces -----------------------------------------------------------------------
class ModelBuilder:
    """Builds every piece of a :class:`VermeerModel` from ``spec`` through ``registry``, and
    assembles Shallow-UViT and U-Net models from them."""

    def __init__(self, spec: RunSpec, registry: Registry) -> None:
        self.spec, self.registry = spec, registry
        self.grid: int = spec.model.grid
        self.cond_dim: int = spec.model.cond_dim
        self.widths: dict[int, int] = {int(r): int(c) for r, c in spec.model.widths.items()}
        self._block: BlockFamily | None = None

    # pieces
    @property
    def block(self) -> BlockFamily:
        if self._block is None:
            self._block = self.registry.build(self.spec.model.block, "block")
        return self._block

    def width(self, resolution: int) -> int:
        try:
            return self.widths[resolution]
        except KeyError:
            raise ValueError(
                f"model.widths has no channel count for resolution {resolution}; add "
                f"'{resolution}: <channels>' (it has {sorted(self.widths)})"
            ) from None

    def text_encoder(self) -> nn.Module:
        return self.registry.build(self.spec.model.text_encoder, "text_encoder")

    def cond(self, text_dim: int) -> nn.Module:
        return Conditioning(self.cond_dim, text_dim)

    def core(self, text_dim: int) -> nn.Module:
        attention = self.registry.build(self.spec.model.attention, "attention")

        def build() -> nn.Module:
            return self.registry.build(
                self.spec.model.core, "core", channels=self.width(self.grid), grid=self.grid,
                cond_dim=self.cond_dim, text_dim=text_dim, attention=attention,
            )

        # On meta, then initialised block by block by the core's own reset_parameters
        # (vermeer_core.core_init): no full copy of a new core is made before the engine
        # shards it, and a plain build gets the same values. A core that cannot be built on
        # meta, has no reset_parameters, or has buffers (which reset_parameters need not
        # restore) is built for real (a meta build draws no random numbers: same stream).
        if torch.empty(0).is_meta:  # built under torch.device("meta") (replay, plan): structure only
            return build()
        try:
            with torch.device("meta"):
                core = build()
        except (NotImplementedError, RuntimeError):
            return build()
        if not callable(getattr(core, "reset_parameters", None)) or any(True for _ in core.buffers()):
            return build()
        seed = int(torch.randint(0, 2**62, ()).item())  # from the stage seed, in either mode
        deferred = _DEFERRED.get()
        if deferred is not None:
            ids = frozenset(id(t) for t in chain(core.parameters(), core.buffers()))
            deferred.append(DeferredCore(core, seed, ids))
            return core
        real = copy.deepcopy(core).to_empty(device="cpu")
        targets = dict(chain(real.named_parameters(), real.named_buffers()))
        init_in_groups(core, seed, lambda name, value: targets[name].copy_(value))
        return real

    def stem(self, resolution: int, factor: int) -> nn.Module:
        return self.block.stem(self.width(resolution // factor), factor)

    def head(self, resolution: int, factor: int) -> nn.Module:
        return self.block.head(self.width(resolution // factor), factor)

    def encoder(self, r: int) -> nn.Module:
        return self.block.encoder(self.width(r), self.width(r // 2), self.cond_dim)

    def decoder(self, r: int) -> nn.Module:
        return self.block.decoder(self.width(r // 2), self.width(r), self.width(r), self.cond_dim)

    def resblock(self, resolution: int) -> nn.Module:
        return self.block.resblock(self.width(resolution), self.cond_dim)

    def _core_group(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        text = self.text_encoder()
        return text, self.cond(text.dim), self.core(text.dim)

    def _check_resolution(self, resolution: int) -> None:
        ratio = resolution / self.grid
        if ratio < 1 or ratio != 2 ** round(math.log2(ratio)):
            raise ValueError(f"resolution {resolution} is not grid*2^k for grid {self.grid}")

    # assembly
    def shallow_uvit(self, resolution: int) -> VermeerModel:
        """The core-pretraining Shallow-UViT: patchify stem straight to the GxG grid, one
        ResBlock, the core, one ResBlock, an un-patchify head. Every module is new."""
        self._check_resolution(resolution)
        factor = resolution // self.grid
        text, cond, core = self._core_group()
        parts: dict[str, nn.Module] = {
            "text": text,
            "cond": cond,
            "core": core,
            "stem": self.stem(resolution, factor),
            "shallow_in": self.resblock(self.grid),
            "shallow_out": self.resblock(self.grid),
            "head": self.head(resolution, factor),
        }
        model = VermeerModel(
            resolution=resolution, grid=self.grid, stem_factor=factor, new_modules=frozenset(parts), **parts
        )
        model.always_frozen = _frozen_at_build(model, None)
        return model

    def unet(
        self, resolution: int, reuse: VermeerModel | None = None, keep_stages: bool = True
    ) -> VermeerModel:
        """A U-Net at ``resolution``: 3x3 stem, an encoder/decoder pair for every r in
        R, R/2, ..., 2G, the core. With ``reuse``, its text/cond/core modules are taken as they
        are (same tensors) and, if ``keep_stages``, its encoder/decoder pairs too; the rest is
        new. ``reuse``'s stem, head and Shallow-UViT blocks are never taken."""
        self._check_resolution(resolution)
        stages = [resolution // 2**i for i in range(int(math.log2(resolution // self.grid)))]
        encoders: dict[int, nn.Module] = {}
        decoders: dict[int, nn.Module] = {}
        if reuse is None:
            text, cond, core = self._core_group()
            new = {"text", "cond", "core", "stem", "head"}
        else:
            if reuse.grid != self.grid:
                raise ValueError(f"cannot reuse a grid-{reuse.grid} model in a grid-{self.grid} spec")
            text, cond, core = reuse.text, reuse.cond, reuse.core
            new = {"stem", "head"}
            for r in stages:
                if keep_stages and _key(r) in reuse.encoders:
                    encoders[r], decoders[r] = reuse.encoders[_key(r)], reuse.decoders[_key(r)]
        for r in stages:
            if r not in encoders:
                encoders[r], decoders[r] = self.encoder(r), self.decoder(r)
                new |= {f"encoders.{_key(r)}", f"decoders.{_key(r)}"}
        model = VermeerModel(
            resolution=resolution,
            grid=self.grid,
            text=text,
            cond=cond,
            core=core,
            stem=self.stem(resolution, 1),
            head=self.head(resolution, 1),
            encoders=encoders,
            decoders=decoders,
            new_modules=frozenset(new),
        )
        model.always_frozen = _frozen_at_build(model, reuse)
        return model


def _frozen_at_build(model: VermeerModel, reuse: VermeerModel | None) -> frozenset[str]:
    """Parameters a component chose to freeze: new ones built with ``requires_grad=False``, and
    reused ones ``reuse`` already knew as such (phases may have frozen the others since)."""
    inherited = reuse.always_frozen if reuse is not None else frozenset()
    return frozenset(
        name
        for name, p in model.named_parameters()
        if (not p.requires_grad if _under(name, model.new_modules) else name in inherited)
    )


# --- growth --------------------------------------------------------------------------------
@dataclass(frozen=True)
class GrowthContext:
    """What a growth policy knows about the stage it builds."""

    stage: int
    resolution: int
    prev_resolution: int | None
    spec: RunSpec
    builder: ModelBuilder
    registry: Registry


def growth_context(spec: RunSpec, registry: Registry, stage: int) -> GrowthContext:
    if not 0 <= stage < len(spec.stages):
        raise ValueError(f"stage {stage} does not exist; the spec has stages 0..{len(spec.stages) - 1}")
    return GrowthContext(
        stage=stage,
        resolution=spec.stages[stage].resolution,
        prev_resolution=spec.stages[stage - 1].resolution if stage > 0 else None,
        spec=spec,
        builder=ModelBuilder(spec, registry),
        registry=registry,
    )


def _policy(spec: RunSpec, registry: Registry, stage: int) -> GrowthPolicy:
    return registry.build(spec.stages[stage].growth, "growth_policy")


def stage_seed(seed: int, stage: int) -> int:
    """The initialisation seed of ``stage``: distinct per stage, fixed by the run's seed."""
    return (seed * 1_000_003 + stage * 7919 + 1) % 2**63


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # fork_rng restores the caller's generator afterwards, so building a model neither depends
    # on nor disturbs torch.manual_seed elsewhere. CPU only: modules are built on the CPU (or
    # meta) device and moved afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_stage_model(
    spec: RunSpec, registry: Registry, stage: int, prev: VermeerModel | None = None
) -> VermeerModel:
    """The model of ``stage``, grown from ``prev`` (the previous stage's model) by the stage's
    growth policy. New weights are a deterministic function of (spec.seed, stage)."""
    ctx = growth_context(spec, registry, stage)
    if stage > 0 and prev is not None and prev.resolution != ctx.prev_resolution:
        raise ValueError(
            f"stage {stage} grows from the stage {stage - 1} model at {ctx.prev_resolution}, "
            f"got a model at {prev.resolution}"
        )
    with _seeded(stage_seed(spec.seed, stage)):
        model = _policy(spec, registry, stage).grow(prev, ctx)
    if model.resolution != ctx.resolution:
        raise ValueError(
            f"growth policy {spec.stages[stage].growth.type!r} built a {model.resolution} model "
            f"for stage {stage} at {ctx.resolution}"
        )
    model.logsnr_offset = conditioning_offset(spec, stage)
    return model


def conditioning_offset(spec: RunSpec, stage: int) -> float:
    """What stage ``stage``'s model adds to the log-SNR its conditioning sees.

    ``diffusion.conditioning: logsnr`` (the default): 0, the model is told its input's log-SNR.
    ``normalized-logsnr``: ``2 log(R / R0)``, R the stage's resolution and R0 the first
    stage's. Averaging 2x2 pixels of ``alpha x + sigma eps`` keeps the signal and halves the
    noise's standard deviation, so an image's noise at log-SNR ``lam`` is, seen through
    (R/R0)^2-pixel averages (the grid the core works on), noise at ``lam + 2 log(R/R0)``. The
    normalised level is therefore what the core's features carry whatever the stage's
    resolution: a core pretrained at R0 keeps seeing the levels it learnt, and with the
    resolution-shifted schedules (``shifted-cosine``: ``lam_R(t) = lam_R0(t) - 2 log(R/R0)``)
    the conditioning at a given t is the same at every stage. This is simple diffusion's
    shift argument (Hoogeboom et al. 2023, §3.1) applied to the conditioning rather than to the
    schedule; the diffusion maths (alpha, sigma, targets, samplers) keep the true log-SNR.
    """
    if spec.diffusion.conditioning == "logsnr":
        return 0.0
    return 2.0 * math.log(spec.stages[stage].resolution / spec.stages[0].resolution)


def stage_transfers(model: VermeerModel, prev: VermeerModel | None, stage: int) -> dict[str, Transfer]:
    """``model.transfers`` resolved to one checked :class:`Transfer` per target tensor (names
    and shapes against ``prev``, which may be a meta-device model). Raises
    :class:`TransferError` naming both tensors."""
    if not model.transfers:
        return {}
    if prev is None:
        raise TransferError(f"stage {stage}: transfers {sorted(model.transfers)} need a previous stage")

    def shapes(m: VermeerModel) -> dict[str, torch.Size]:
        return {n: t.shape for n, t in m.state_dict(keep_vars=True).items()}

    return resolve_transfers(model.transfers, shapes(model), shapes(prev), where=f"stage {stage}: ")


def stage_phases(spec: RunSpec, registry: Registry, stage: int) -> list[Phase]:
    """The training phases of ``stage``, in order."""
    return _policy(spec, registry, stage).phases(growth_context(spec, registry, stage))


def _has_unsaved_buffers(model: nn.Module) -> bool:
    saved = set(model.state_dict())
    return any(name not in saved for name, _ in model.named_buffers())


def replay(spec: RunSpec, registry: Registry, stage: int, device: torch.device | str = "cpu") -> VermeerModel:
    """The topology of ``stage``, grown structurally from stage 0 (for resume, and as the
    ``prev`` a growth policy grows from at run time).

    Weights are NOT meaningful: load a state dict into the result. Growth runs on the meta
    device (no memory, no init cost); with ``device="meta"`` the result stays there, else it
    is materialised on ``device`` with uninitialised storage. If a component cannot be built
    on meta, or keeps non-persistent buffers that ``to_empty`` would leave as garbage and a
    state dict would not restore, the stages are built for real instead (slower, same
    topology, freshly initialised values).
    """
    growth_context(spec, registry, stage)  # validates ``stage``
    try:
        with torch.device("meta"):
            model = _grow_to(spec, registry, stage)
    except (NotImplementedError, RuntimeError):
        model = None
    if model is None or _has_unsaved_buffers(model):
        real = _grow_to(spec, registry, stage)
        return real if torch.device(device).type == "meta" else real.to(device)
    if torch.device(device).type == "meta":
        return model
    return model.to_empty(device=device)


def _grow_to(spec: RunSpec, registry: Registry, stage: int) -> VermeerModel:
    model: VermeerModel | None = None
    for k in range(stage + 1):
        model = build_stage_model(spec, registry, k, prev=model)
    assert model is not None
    return model
