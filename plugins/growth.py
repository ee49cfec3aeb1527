"""Growth policies ``greedy`` (Vermeer, arXiv 2405.16759) and ``from-scratch`` (baseline).

``greedy``: stage 0 pretrains a Shallow-UViT; every later stage discards the shallow periphery
(stem, head, Shallow-UViT ResBlocks), keeps the core (and the text encoder and conditioning)
as the same tensors, keeps earlier encoder/decoder stages (``keep_stages``) and adds new
outer stages. Its default phases train the new layers with the core frozen (A), then
everything (B). ``from-scratch``: a fresh U-Net at every stage, trained end to end.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer

from vermeer_core.api import (
    check_phase_names,
    ComponentConfig,
    GrowthContext,
    hookimpl,
    Phase,
    PhaseConfig,
    Registry,
    VermeerModel,
)
from vermeer_plugins.inherit import inherit_init

__all__ = [
    "FromScratchConfig",
    "FromScratchGrowth",
    "GreedyGrowth",
    "GreedyGrowthConfig",
    "vermeer_register",
]


class _PhasesConfig(ComponentConfig):
    phases: list[PhaseConfig]

    @field_validator("phases")
    @classmethod
    def _unique(cls, phases: list[PhaseConfig]) -> list[PhaseConfig]:
        return check_phase_names(phases)

    def smoke(self) -> _PhasesConfig:
        return self.model_copy(update={"phases": [p.model_copy(update={"steps": 2}) for p in self.phases]})


class GreedyGrowthConfig(_PhasesConfig):
    phases: list[PhaseConfig] = Field(
        default_factory=lambda: [
            PhaseConfig(name="A", steps=1000, trainable="new"),
            PhaseConfig(name="B", steps=1000, trainable="all"),
        ],
        description="training phases of the stage; the default trains new layers with the "
        "core frozen, then everything (at stage 0 every layer is new)",
    )
    keep_stages: bool = Field(
        True, description="keep the previous stage's encoder/decoder stages (else rebuild them)"
    )
    init: Literal["fresh", "inherit", "inherit-denoiser"] = Field(
        "fresh",
        description="new outer stages: 'fresh' (random, identity ResBlocks, zero head), "
        "'inherit' (start as the previous stage's model output on the 2x down-sampled input, "
        "up-sampled) or 'inherit-denoiser' (start as the previous stage's denoiser, up-sampled, "
        "plus a Wiener estimate of the detail within each token: samples at step 0 are prev's; needs "
        "diffusion.conditioning: normalized-logsnr). Growth from the Shallow-UViT stage only; "
        "see vermeer_plugins.inherit",
    )
    detail_std: float = Field(
        0.05, gt=0.0, lt=1.0,
        description="inherit-denoiser: the assumed std of the images' detail within a token (pixels "
        "minus their token-block mean, in [-1, 1] units) for the Wiener estimate; the synthetic "
        "data's is 0.066 (one object) to 0.082 (two) at 64 px",
    )

    @model_serializer(mode="wrap")
    def _drop_defaults(self, handler: Any) -> dict[str, Any]:
        # left out of a dump while default, so runs checkpointed before it existed keep their hash
        out = handler(self)
        if out.get("detail_std") == 0.05:
            del out["detail_std"]
        return out


class FromScratchConfig(_PhasesConfig):
    phases: list[PhaseConfig] = Field(
        default_factory=lambda: [PhaseConfig(name="all", steps=2000, trainable="all")],
        description="training phases of the stage",
    )


class _ConfiguredPhases:
    config: _PhasesConfig

    def phases(self, ctx: GrowthContext) -> list[Phase]:
        return [p.phase() for p in self.config.phases]


class GreedyGrowth(_ConfiguredPhases):
    """Greedy growing (Vermeer, arXiv 2405.16759): keep the core, add outer stages."""

    def __init__(self, config: GreedyGrowthConfig) -> None:
        self.config = config

    def grow(self, prev: VermeerModel | None, ctx: GrowthContext) -> VermeerModel:
        if ctx.stage == 0:
            if prev is not None:
                raise ValueError("greedy growth builds stage 0 from nothing; got a previous model")
            return ctx.builder.shallow_uvit(ctx.resolution)
        if prev is None:
            raise ValueError(
                f"greedy growth at stage {ctx.stage} needs the stage {ctx.stage - 1} model to grow "
                "from (use vermeer_core.model.replay to rebuild it)"
            )
        model = ctx.builder.unet(ctx.resolution, reuse=prev, keep_stages=self.config.keep_stages)
        if self.config.init != "fresh":
            detail = self.config.detail_std if self.config.init == "inherit-denoiser" else None
            return inherit_init(model, prev, ctx, detail_std=detail)
        if prev.shallow_in is not None and prev.encoders:  # an inherited stage: keep its blocks
            model.shallow_in, model.shallow_out = prev.shallow_in, prev.shallow_out
        return model


class FromScratchGrowth(_ConfiguredPhases):
    """Baseline: a fresh U-Net at every stage; nothing is carried over."""

    def __init__(self, config: FromScratchConfig) -> None:
        self.config = config

    def grow(self, prev: VermeerModel | None, ctx: GrowthContext) -> VermeerModel:
        return ctx.builder.unet(ctx.resolution)


@hookimpl
def vermeer_register(registry: Registry) -> None:
    registry.add("growth_policy", "greedy", GreedyGrowth, GreedyGrowthConfig)
    registry.add("growth_policy", "from-scratch", FromScratchGrowth, FromScratchConfig)
