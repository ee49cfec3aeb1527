"""``fade-in``: a ProGAN-style growth policy for vermeer (Karras et al. 2018, "Progressive
Growing of GANs", section 3: new layers are faded in smoothly).

Stage 0 trains a small U-Net. Every later stage keeps every module of the previous U-Net
(text encoder, conditioning, core and all encoder/decoder stages, as the same tensors), adds
a new outermost encoder/decoder stage with a new stem and head, and during the phase named
``fade_phase`` blends the new outer stage with the previous stage's path:

* input:  ``h = alpha * E_R(stem_R(x)) + (1 - alpha) * stem_{R/2}(avgpool(x))``
* output: ``y = alpha * head_R(D_R(h)) + (1 - alpha) * upsample(head_{R/2}(h))``

with ``alpha`` ramped linearly from 0 to 1 over that phase (1 afterwards). The previous
stage's trained stem and head become ``fade_stem`` / ``fade_head`` through *transfers*
(``model.transfers``): the policy never reads trained values itself, it names them, and the
engine copies weights, EMA and optimizer state. ``alpha`` is a buffer set from the phase's
progress by two lifecycle hooks (``vermeer_phase_start``, ``vermeer_step_end``), so a resumed
run sets the same value as an uninterrupted one.

Written only against ``vermeer_core.api``, as any third-party plugin would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from vermeer_core.api import (
    ComponentConfig,
    GrowthContext,
    Phase,
    PhaseConfig,
    Registry,
    TextEmbedding,
    VermeerModel,
    check_phase_names,
    hookimpl,
)

__all__ = ["FadeInConfig", "FadeInGrowth", "FadeInUNet", "fade_alpha", "vermeer_register"]

__version__ = "0.1.0"


class FadeInConfig(ComponentConfig):
    """Config of ``type: fade-in``."""

    phases: list[PhaseConfig] = Field(
        default_factory=lambda: [PhaseConfig(name="fade", steps=1000), PhaseConfig(name="stable", steps=1000)],
        description="training phases of every stage; alpha ramps 0 -> 1 over `fade_phase`",
    )
    fade_phase: str = Field("fade", description="the phase over which the new outer stage fades in")

    @model_validator(mode="after")
    def _fade_phase_exists(self) -> FadeInConfig:
        check_phase_names(self.phases)
        names = [p.name for p in self.phases]
        if self.fade_phase not in names:
            raise ValueError(f"fade_phase {self.fade_phase!r} is not one of the phases {names}")
        return self

    def smoke(self) -> FadeInConfig:
        return self.model_copy(update={"phases": [p.model_copy(update={"steps": 2}) for p in self.phases]})


def fade_alpha(phase_names: Sequence[str], fade_phase: str, phase: str, done: int, steps: int) -> float:
    """The blend weight of the new outer stage after ``done`` of ``steps`` steps of ``phase``:
    0 before the fade phase, ``done / steps`` during it, 1 after it."""
    order, fade = list(phase_names).index(phase), list(phase_names).index(fade_phase)
    if order < fade:
        return 0.0
    if order > fade:
        return 1.0
    return min(1.0, done / steps)


class FadeInUNet(VermeerModel):
    """A U-Net whose outermost stage is blended with the previous resolution's path."""

    def __init__(
        self, base: VermeerModel, fade_stem: nn.Module, fade_head: nn.Module, phase_names: Sequence[str],
        fade_phase: str,
    ) -> None:
        rs = base.encoder_resolutions
        super().__init__(
            resolution=base.resolution, grid=base.grid, text=base.text, cond=base.cond, core=base.core,
            stem=base.stem, head=base.head, stem_factor=base.stem_factor,
            encoders={r: base.encoders[f"r{r}"] for r in rs}, decoders={r: base.decoders[f"r{r}"] for r in rs},
            new_modules=base.new_modules | {"fade_stem", "fade_head", "fade_alpha"},
        )
        self.always_frozen = base.always_frozen
        self.fade_stem, self.fade_head = fade_stem, fade_head
        # persistent: checkpointed with the model, so a resumed run starts from the same value
        self.register_buffer("fade_alpha", torch.zeros(()))
        self.phase_names, self.fade_phase = tuple(phase_names), fade_phase

    def set_progress(self, phase: Phase, done: int) -> None:
        with torch.no_grad():
            self.fade_alpha.fill_(fade_alpha(self.phase_names, self.fade_phase, phase.name, done, phase.steps))

    def forward(self, x_t: Tensor, logsnr: Tensor, text: TextEmbedding | Sequence[str]) -> Tensor:
        if not isinstance(text, TextEmbedding):
            text = self.text(list(text))
        if logsnr.ndim == 0:
            logsnr = logsnr.expand(x_t.shape[0])
        cond = self.cond(logsnr, text.pooled)
        encoders, decoders = list(self.encoders.values()), list(self.decoders.values())  # outermost first
        skip_outer, h_new = encoders[0](self.stem(x_t), cond)
        h_old = self.fade_stem(F.avg_pool2d(x_t, 2))
        a = self.fade_alpha.to(h_new.dtype)
        h = a * h_new + (1 - a) * h_old
        skips = []
        for encoder in encoders[1:]:
            skip, h = encoder(h, cond)
            skips.append(skip)
        h = self.core(h, cond, text)
        for decoder, skip in zip(reversed(decoders[1:]), reversed(skips)):
            h = decoder(h, skip, cond)
        new = self.head(decoders[0](h, skip_outer, cond))
        old = F.interpolate(self.fade_head(h), scale_factor=2, mode="nearest")
        return a.to(new.dtype) * new + (1 - a.to(new.dtype)) * old


class FadeInGrowth:
    """Stage 0: a fresh U-Net. Later stages: the previous U-Net plus a faded-in outer stage."""

    def __init__(self, config: FadeInConfig) -> None:
        self.config = config

    def grow(self, prev: VermeerModel | None, ctx: GrowthContext) -> VermeerModel:
        if prev is None:
            return ctx.builder.unet(ctx.resolution)
        if prev.shallow_in is not None:
            raise ValueError(
                f"fade-in grows from a U-Net, but stage {ctx.stage - 1} is a Shallow-UViT; use "
                "fade-in (which builds a U-Net at stage 0) for every stage"
            )
        base = ctx.builder.unet(ctx.resolution, reuse=prev, keep_stages=True)
        half = ctx.prev_resolution
        assert half is not None
        model = FadeInUNet(
            base, ctx.builder.stem(half, 1), ctx.builder.head(half, 1),
            [p.name for p in self.config.phases], self.config.fade_phase,
        )
        # trained values of the previous stage's stem and head, under new names
        model.transfers["fade_stem"] = "stem"
        model.transfers["fade_head"] = "head"
        return model

    def phases(self, ctx: GrowthContext) -> list[Phase]:
        return [p.phase() for p in self.config.phases]


def _fade_models(model: Any) -> list[FadeInUNet]:
    return [m for m in model.modules() if isinstance(m, FadeInUNet)]


@hookimpl
def vermeer_phase_start(phase: Phase, phase_step: int, model: Any) -> None:
    for m in _fade_models(model):
        m.set_progress(phase, phase_step)


@hookimpl
def vermeer_step_end(phase: Phase, phase_step: int, model: Any) -> None:
    for m in _fade_models(model):
        m.set_progress(phase, phase_step)


@hookimpl
def vermeer_register(registry: Registry) -> None:
    registry.add("growth_policy", "fade-in", FadeInGrowth, FadeInConfig)
