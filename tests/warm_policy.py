"""A test growth policy that warm-starts every tensor of a fresh stage-1 U-Net through
transfers (also importable by torchrun workers through an entry point: see
tests/test_transfer.py), and the tiny two-stage spec that uses it."""

from __future__ import annotations

import copy
from typing import Any

import torch
from engine_spec import BASE
from pydantic import Field

from vermeer_core.api import (
    ComponentConfig,
    GrowthContext,
    Phase,
    PhaseConfig,
    Registry,
    Transfer,
    VermeerModel,
    hookimpl,
)

#: string transfers of the test policy (the spec can replace them): everything of the fresh
#: stage-1 U-Net's core group from the trained one, the second core block from the FIRST
#: trained block (depth stacking: more specific than "core"), and a decoder block from the
#: discarded Shallow-UViT periphery.
COPIES = {
    "text": "text",
    "cond": "cond",
    "core": "core",
    "core.blocks.1": "core.blocks.0",
    "decoders.r8.blocks.0": "shallow_out",
}


def _half_head_bias(b: torch.Tensor) -> torch.Tensor:
    return b[:3] * 0.5  # the patchify head's 12 outputs -> the conv head's 3


def _flip(w: torch.Tensor) -> torch.Tensor:
    return w.flip(0)  # a permutation of output channels: moments may follow it


FNS = {
    "head.proj.bias": Transfer(_half_head_bias, ("head.proj.bias",)),
    "encoders.r8.blocks.0.conv1.weight": Transfer(_flip, ("shallow_in.conv1.weight",), moments=True),
}


class WarmConfig(ComponentConfig):
    phases: list[PhaseConfig]
    copies: dict[str, str] = Field(default_factory=lambda: dict(COPIES))
    fns: bool = True


class WarmStart:
    """Stage 0: a Shallow-UViT. Later: a FRESH U-Net (every module new) warm-started by transfers."""

    def __init__(self, config: WarmConfig) -> None:
        self.config = config

    def grow(self, prev: VermeerModel | None, ctx: GrowthContext) -> VermeerModel:
        if ctx.stage == 0:
            return ctx.builder.shallow_uvit(ctx.resolution)
        model = ctx.builder.unet(ctx.resolution)
        model.transfers.update(self.config.copies)
        if self.config.fns:
            model.transfers.update(FNS)
        return model

    def phases(self, ctx: GrowthContext) -> list[Phase]:
        return [p.phase() for p in self.config.phases]


class WarmPlugin:
    @hookimpl
    def vermeer_register(self, registry: Registry) -> None:
        registry.add("growth_policy", "test-warm", WarmStart, WarmConfig)


#: the plugin object an entry point names (``test-warm = "warm_policy:PLUGIN"``)
PLUGIN = WarmPlugin()



def warm_data(**train: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["model"]["core"]["depth"] = 2
    data["train"].update(train)
    data["stages"][0]["growth"] = {"type": "test-warm", "phases": [{"name": "core", "steps": 6}]}
    data["stages"][1]["growth"] = {"type": "test-warm", "phases": [
        {"name": "A", "steps": 2, "trainable": [{"match": "core.blocks.1", "lr_mult": 0.1, "name": "stacked"},
                                                 "all-but-core"]},
        {"name": "B", "steps": 4, "trainable": "all", "lr_mult": 0.5},
    ]}
    return data
