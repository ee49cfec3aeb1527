"""A tiny run spec for model and growth tests: real registered components, CPU-fast sizes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vermeer_core.plugins import get_registry
from vermeer_core.spec import RunSpec, parse_spec

__all__ = ["tiny_spec"]


def tiny_spec(
    resolutions: Sequence[int] = (64, 128, 256),
    *,
    grid: int = 16,
    growth: dict[str, Any] | None = None,
    seed: int = 0,
    widths: dict[int, int] | None = None,
    num_res_blocks: int = 1,
) -> RunSpec:
    """Stages at ``resolutions`` growing from a ``grid`` core: core width 32, depth 1; 8 conv
    channels up to 256 and 4 above (so a 1024 forward stays around a second on a CPU)."""
    top = max(resolutions)
    if widths is None:
        widths = {}
        r = grid
        while r <= top:
            widths[r] = 8 if r <= 256 else 4
            r *= 2
    data = {
        "name": "tiny",
        "seed": seed,
        "model": {
            "grid": grid,
            "cond_dim": 16,
            "widths": widths,
            "core": {"type": "shallow-uvit", "width": 32, "depth": 1, "heads": 2},
            "block": {"type": "resblock", "num_res_blocks": num_res_blocks, "groups": 4},
            "text_encoder": {"type": "tiny", "dim": 16, "depth": 1, "heads": 2},
            "attention": {"type": "math"},
        },
        "stages": [{"resolution": r, "batch_size": 1, "growth": growth or {"type": "greedy"}} for r in resolutions],
    }
    return parse_spec(data, get_registry(), "<tiny_spec>")
