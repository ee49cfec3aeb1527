"""dataset ``synthetic``: procedural captioned scenes of coloured shapes; no download.

A sample is a pure function of ``(seed, index)``: :func:`scene` draws a resolution-independent
description (shapes, colours, sizes, positions in unit coordinates, background), :func:`caption`
states it exactly ("a small red circle above a large blue square", "two large yellow
squares"), and :func:`render` draws it at any resolution with analytic anti-aliasing.

For evaluation a stream also hands out *held-out* scenes (:meth:`SyntheticStream.eval_prompts`,
drawn from a seed space the training stream never uses) with their exact descriptions and
ground-truth renders, which the ``alignment`` metric (:mod:`vermeer_plugins.alignment`)
checks generated images against.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from vermeer_core.api import Batch, ComponentConfig, EvalPrompt, hookimpl

__all__ = [
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "Item",
    "Scene",
    "SyntheticConfig",
    "SyntheticStream",
    "build_synthetic",
    "caption",
    "eval_scene",
    "relation_holds",
    "render",
    "scene",
    "vermeer_register",
]

#: Object colours (sRGB in [0, 1]); saturated and pairwise >= 0.35 apart so that a pixel's
#: nearest palette entry names its colour. Backgrounds are near-greys, far from all of them.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "orange": (0.95, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.10, 0.25, 0.90),
    "purple": (0.55, 0.15, 0.80),
    "pink": (0.95, 0.50, 0.75),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
_SIZES = {"small": (0.07, 0.11), "large": (0.15, 0.21)}  # half-extent r, unit coordinates
_COUNT_WORDS = {2: "two", 3: "three"}
_MARGIN = 0.02  # from objects to the image border
_GAP = 0.04  # between the bounding boxes of two objects (>= 2 px in a 64 px image)
_RELATION_SLACK = 0.05  # relation layouts: the ruling axis wins by this much, so it reads clearly


class SyntheticConfig(ComponentConfig):
    """Options of the procedural dataset."""

    max_objects: int = Field(2, ge=1, le=3, description="scenes hold 1..max_objects objects")
    background: Literal["plain", "gradient"] = Field(
        "plain", description="near-grey background: one colour, or a linear gradient of two"
    )
    relations: bool = Field(True, description="two-object scenes may be captioned with a spatial relation")
    seed_offset: int = Field(
        0, ge=0, description="added to the run seed: a different set of scenes (e.g. held out for evaluation)"
    )
    n: int | None = Field(
        None, gt=0, description="finite dataset of n scenes, repeated in order; None = endless, never repeats"
    )


@dataclass(frozen=True)
class Item:
    """One object; ``x, y`` is its bounding-box centre and ``r`` its half-extent, in unit
    coordinates (x right, y down, the image is [0, 1]^2)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    r: float


@dataclass(frozen=True)
class Scene:
    """A resolution-independent scene. ``layout`` is "single", "list", "count" or "relation"
    (then ``relation`` says how ``items[0]`` stands to ``items[1]``). ``background`` holds the
    gradient's two end colours (equal for a plain background), ``angle`` its direction."""

    items: tuple[Item, ...]
    layout: Literal["single", "list", "count", "relation"]
    relation: str | None
    background: tuple[tuple[float, float, float], tuple[float, float, float]]
    angle: float


# --- scene ---------------------------------------------------------------------------------
def _background_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    grey = rng.uniform(0.15, 0.85)
    tint = rng.uniform(-0.04, 0.04, size=3)
    return tuple(float(v) for v in np.clip(grey + tint, 0.0, 1.0))  # type: ignore[return-value]


def _separated(xs: np.ndarray, ys: np.ndarray, rs: np.ndarray) -> bool:
    """True when every pair of bounding boxes is at least ``_GAP`` apart on some axis."""
    dx = np.abs(xs[:, None] - xs[None, :])
    dy = np.abs(ys[:, None] - ys[None, :])
    gap = np.maximum(dx, dy) - (rs[:, None] + rs[None, :])
    np.fill_diagonal(gap, np.inf)
    return bool((gap >= _GAP).all())


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], slack: float) -> bool:
    """Whether a point ``a`` is ``relation`` point ``b``: the ruling axis's offset has the right
    sign and exceeds the other axis's by ``slack``."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # from a to b; y grows downward
    if relation in ("above", "below"):
        sign = 1.0 if relation == "above" else -1.0
        return sign * dy > abs(dx) + slack
    sign = 1.0 if relation == "left of" else -1.0
    return sign * dx > abs(dy) + slack


def _place(
    rng: np.random.Generator, rs: np.ndarray, relation: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rejection-sample non-overlapping centres (and the relation, if any). Crowded draws
    shrink toward the small end of each size class every 64 failures, so it always ends."""
    lo = np.array([_SIZES["small"][0] if r <= _SIZES["small"][1] else _SIZES["large"][0] for r in rs])
    for attempt in range(100_000):
        if attempt and attempt % 64 == 0:
            rs = np.maximum(lo, rs * 0.95)
        xs = rng.uniform(rs + _MARGIN, 1.0 - rs - _MARGIN)
        ys = rng.uniform(rs + _MARGIN, 1.0 - rs - _MARGIN)
        if not _separated(xs, ys, rs):
            continue
        if relation is not None and not relation_holds(relation, (xs[0], ys[0]), (xs[1], ys[1]), _RELATION_SLACK):
            continue
        return xs, ys, rs
    raise RuntimeError("synthetic: could not place the objects of a scene")  # unreachable in practice


def scene(seed: int, index: int, config: SyntheticConfig | None = None) -> Scene:
    """The scene of sample ``index`` for ``seed``: a pure function of its arguments (a fresh
    generator seeded with ``(seed, index)``), so it is the same for any batch size or rank.
    ``config.seed_offset`` and ``config.n`` are not applied here (the stream applies them)."""
    return _draw(np.random.default_rng([_check_seed(seed, index), index]), config or SyntheticConfig())


#: Third entropy word of held-out scenes. Training scenes seed their generator with the words
#: (seed, index), held-out ones with (seed, index, _HELD_OUT): for seeds and indices below 2^32
#: (one word each) these are different word sequences, so no training stream draws a held-out
#: scene's generator. (Captions are not held out: their vocabulary is small; scenes are.)
_HELD_OUT = 0x6576616C  # "eval"


def eval_scene(seed: int, index: int, config: SyntheticConfig | None = None) -> Scene:
    """Held-out scene ``index`` of evaluation seed ``seed``: drawn like :func:`scene` (same
    distribution for the same ``config``) from a seed space the training stream never uses."""
    return _draw(np.random.default_rng([_check_seed(seed, index), index, _HELD_OUT]), config or SyntheticConfig())


def _check_seed(seed: int, index: int) -> int:
    if seed < 0 or index < 0:
        raise ValueError(f"synthetic: seed and index must be >= 0, got seed={seed}, index={index}")
    return seed


def _draw(rng: np.random.Generator, cfg: SyntheticConfig) -> Scene:
    """One scene from ``rng`` under ``cfg``."""
    k = int(rng.integers(1, cfg.max_objects + 1))
    u = rng.random()
    layout: Literal["single", "list", "count", "relation"]
    if k == 1:
        layout = "single"
    elif u < 0.25:
        layout = "count"
    elif cfg.relations and k == 2 and u < 0.75:
        layout = "relation"
    else:
        layout = "list"
    names = list(COLOURS)
    if layout == "count":
        colours = [names[int(rng.integers(len(names)))]] * k
        shapes = [SHAPES[int(rng.integers(len(SHAPES)))]] * k
        sizes = [("small", "large")[int(rng.integers(2))]] * k
        rs = np.full(k, rng.uniform(*_SIZES[sizes[0]]))
    else:
        # Distinct colours: each described object is identified by its colour in a picture.
        colours = [names[int(i)] for i in rng.choice(len(names), size=k, replace=False)]
        shapes = [SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=k)]
        sizes = [("small", "large")[int(i)] for i in rng.integers(2, size=k)]
        rs = np.array([rng.uniform(*_SIZES[s]) for s in sizes])
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))] if layout == "relation" else None
    xs, ys, rs = _place(rng, rs, relation)
    c0 = _background_colour(rng)
    c1 = _background_colour(rng) if cfg.background == "gradient" else c0
    angle = float(rng.uniform(0.0, 2.0 * math.pi)) if cfg.background == "gradient" else 0.0
    items = tuple(
        Item(shapes[i], colours[i], sizes[i], float(xs[i]), float(ys[i]), float(rs[i])) for i in range(k)
    )
    return Scene(items, layout, relation, (c0, c1), angle)


def caption(s: Scene) -> str:
    """The exact description of a scene ("a large green triangle", "two small yellow squares",
    "a small red circle above a large blue square", "a red ..., a ... and a ...")."""

    def one(it: Item) -> str:
        return f"a {it.size} {it.colour} {it.shape}"

    if s.layout == "count":
        it = s.items[0]
        return f"{_COUNT_WORDS[len(s.items)]} {it.size} {it.colour} {it.shape}s"
    if s.layout == "relation":
        return f"{one(s.items[0])} {s.relation} {one(s.items[1])}"
    parts = [one(it) for it in s.items]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# --- render --------------------------------------------------------------------------------
def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (negative inside; exact inside, a bound outside) from offsets to the
    centre; ``dx`` is (1, w), ``dy`` (h, 1)."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    # Upward isosceles triangle filling its box: apex (0, -r), base corners (+-r, r). Side
    # normals are (+-2, -1)/sqrt(5); the distance is the largest over the three edges.
    return np.maximum(dy - r, (2.0 * np.abs(dx) - dy - r) / math.sqrt(5.0))


def _render_into(out: np.ndarray, s: Scene) -> None:
    """Draw ``s`` into ``out`` ((3, R, R) float32, overwritten) in [0, 1]."""
    res = out.shape[-1]
    centres = (np.arange(res, dtype=np.float32) + 0.5) / res
    c0 = np.asarray(s.background[0], dtype=np.float32)[:, None, None]
    c1 = np.asarray(s.background[1], dtype=np.float32)[:, None, None]
    if s.background[0] == s.background[1]:
        out[...] = c0
    else:
        # Linear gradient along ``angle``, normalised so the square's corners map to 0 and 1.
        cos, sin = math.cos(s.angle), math.sin(s.angle)
        norm = abs(cos) + abs(sin)
        tx = (centres - 0.5) * (cos / norm)
        ty = (centres - 0.5) * (sin / norm) + 0.5
        t = ty[:, None] + tx[None, :]
        np.multiply(c1 - c0, t[None], out=out)
        out += c0
    for it in s.items:
        # Only the object's box (plus one pixel of anti-aliasing ramp) is touched.
        x0 = max(0, math.floor((it.x - it.r) * res) - 1)
        x1 = min(res, math.ceil((it.x + it.r) * res) + 1)
        y0 = max(0, math.floor((it.y - it.r) * res) - 1)
        y1 = min(res, math.ceil((it.y + it.r) * res) + 1)
        dx = (centres[x0:x1] - np.float32(it.x))[None, :]
        dy = (centres[y0:y1] - np.float32(it.y))[:, None]
        # Analytic anti-aliasing: coverage ramps linearly over one pixel across the edge.
        cov = np.clip(0.5 - _signed_distance(it.shape, dx, dy, np.float32(it.r)) * res, 0.0, 1.0)
        crop = out[:, y0:y1, x0:x1]
        colour = np.asarray(COLOURS[it.colour], dtype=np.float32)[:, None, None]
        crop += (colour - crop) * cov[None]


def render(s: Scene, resolution: int) -> np.ndarray:
    """Render a scene as a (3, R, R) float32 array in [-1, 1] at any ``resolution`` R."""
    if resolution < 1:
        raise ValueError(f"synthetic: resolution must be >= 1, got {resolution}")
    out = np.empty((3, resolution, resolution), dtype=np.float32)
    _render_into(out, s)
    out *= 2.0
    out -= 1.0
    return out


# --- stream --------------------------------------------------------------------------------
class SyntheticStream:
    """Endless batches for one rank: rank r of w takes global sample indices i = k*w + r for
    k = 0, 1, 2, ... in consecutive batches, so the ranks of any world size together see
    exactly the samples of world size 1. With ``n`` set, sample i shows scene i mod n."""

    def __init__(
        self,
        config: SyntheticConfig,
        *,
        resolution: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        if resolution < 1 or batch_size < 1:
            raise ValueError(
                f"synthetic: resolution and batch_size must be >= 1, got {resolution} and {batch_size}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"synthetic: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if seed < 0:
            raise ValueError(f"synthetic: the run seed must be >= 0, got {seed}")
        self.config = config
        self.resolution = resolution
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed + config.seed_offset
        self._k = 0  # this rank's next local sample number

    def eval_prompts(self, n: int, seed: int) -> list[EvalPrompt]:
        """``n`` held-out prompts (:func:`eval_scene` of ``seed``, this stream's config), each
        with its :class:`Scene` for exact checking. Independent of rank and ``seed_offset``."""
        return [EvalPrompt(caption(s), s) for s in (eval_scene(seed, i, self.config) for i in range(n))]

    def eval_references(self, prompts: Sequence[EvalPrompt], resolution: int) -> Tensor:
        """Ground-truth renders of ``prompts`` (from :meth:`eval_prompts`) at ``resolution``,
        (B, 3, R, R) in [-1, 1]: the reference set of distribution metrics."""
        bad = [i for i, p in enumerate(prompts) if not isinstance(p.scene, Scene)]
        if bad:
            raise ValueError(f"synthetic: prompts {bad[:5]} carry no synthetic Scene (use eval_prompts)")
        return torch.from_numpy(np.stack([render(p.scene, resolution) for p in prompts]))

    def scene_at(self, index: int) -> Scene:
        """The scene of global sample ``index``."""
        n = self.config.n
        return scene(self.seed, index % n if n else index, self.config)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            indices = [(self._k + j) * self.world_size + self.rank for j in range(self.batch_size)]
            images = np.empty((self.batch_size, 3, self.resolution, self.resolution), dtype=np.float32)
            captions = []
            for out, i in zip(images, indices):
                s = self.scene_at(i)
                _render_into(out, s)
                captions.append(caption(s))
            images *= 2.0
            images -= 1.0
            # Advance before yielding: a state_dict taken after receiving this batch points past it.
            self._k += self.batch_size
            yield Batch(torch.from_numpy(images), captions)

    def state_dict(self) -> dict[str, Any]:
        """``next_index``: the global index of the next sample this rank will yield."""
        return {"next_index": self._k * self.world_size + self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``next_index`` exactly (same world size); under another world size, at the
        first index >= ``next_index`` that belongs to this rank."""
        nxt = int(state["next_index"])
        if nxt < 0:
            raise ValueError(f"synthetic: next_index must be >= 0, got {nxt}")
        self._k = max(0, -(-(nxt - self.rank) // self.world_size))


def build_synthetic(
    config: SyntheticConfig,
    *,
    resolution: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> SyntheticStream:
    """Factory of dataset ``synthetic`` (see :mod:`vermeer_core.interfaces`)."""
    return SyntheticStream(
        config, resolution=resolution, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed
    )


@hookimpl
def vermeer_register(registry: Any) -> None:
    registry.add("dataset", "synthetic", build_synthetic, SyntheticConfig)


@hookimpl
def vermeer_data_commands(subparsers: Any) -> None:
    """``vermeer data synth``: this dataset's scenes written as shards."""
    from vermeer_plugins.data_commands import add_synth

    add_synth(subparsers)
