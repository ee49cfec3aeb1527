"""Growth policies ``greedy`` (Vermeer, arXiv 2405.16759) and ``from-scratch`` (baseline).

``greedy``: stage 0 pretrains a Shallow-UViT; every later stage discards the shallow periphery
(stem, head, Shallow-UViT ResBlocks), keeps the core (and the text encoder and conditioning)
as the same tensors, keeps earlier encoder/decoder stages (``keep_stages``) and adds new
outer stages. Its default phases train the new layers with the core frozen (A), then
everything (B). ``from-scratch``: a fresh U-Net at every stage, trained end to end.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vermeer_core.hookspecs import hookimpl
from vermeer_core.interfaces import Phase, Trainable
from vermeer_core.model import GrowthContext, VermeerModel
from vermeer_core.registry import ComponentConfig, Registry

__all__ = [
    "FromScratchConfig",
    "FromScratchGrowth",
    "GreedyGrowth",
    "GreedyGrowthConfig",
    "PhaseConfig",
    "vermeer_register",
]


class PhaseConfig(BaseModel):
    """One training phase of a stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(..., min_length=1, description="phase name (unique within the stage)")
    steps: int = Field(..., gt=0, description="optimizer steps")
    lr_mult: float = Field(1.0, gt=0, description="multiplier on optim.lr")
    trainable: Trainable = Field(
        "all", description="'all', 'new' (layers added at this stage) or 'all-but-core'"
    )


def _check_phases(phases: list[PhaseConfig]) -> list[PhaseConfig]:
    if not phases:
        raise ValueError("a stage needs at least one phase")
    names = [p.name for p in phases]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"phase names must be unique within a stage; repeated: {', '.join(repeated)}")
    return phases


class _PhasesConfig(ComponentConfig):
    phases: list[PhaseConfig]

    @field_validator("phases")
    @classmethod
    def _unique(cls, phases: list[PhaseConfig]) -> list[PhaseConfig]:
        return _check_phases(phases)

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


class FromScratchConfig(_PhasesConfig):
    phases: list[PhaseConfig] = Field(
        default_factory=lambda: [PhaseConfig(name="all", steps=2000, trainable="all")],
        description="training phases of the stage",
    )


class _ConfiguredPhases:
    config: _PhasesConfig

    def phases(self, ctx: GrowthContext) -> list[Phase]:
        return [Phase(p.name, p.steps, p.lr_mult, p.trainable) for p in self.config.phases]


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
        return ctx.builder.unet(ctx.resolution, reuse=prev, keep_stages=self.config.keep_stages)


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
