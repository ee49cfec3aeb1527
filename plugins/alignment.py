"""metric ``alignment``: does a generated image show what its synthetic caption says?

The checker (:func:`check`, :func:`score`) reads shapes, colours, sizes, counts and relations
off an image with no pretrained network and tests each atomic proposition of the caption of
a :class:`~vermeer_plugins.synthetic.Scene`; the metric averages them over held-out prompts,
overall and per kind of proposition (colour, shape, size, count, relation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vermeer_plugins.synthetic import COLOURS, Scene, relation_holds

from vermeer_core.api import ComponentConfig, EvalPrompt, hookimpl

__all__ = ["KINDS", "AlignmentConfig", "AlignmentMetric", "Proposition", "check", "score", "vermeer_register"]

#: The kinds of proposition a caption states, in the order the metric reports them.
KINDS: tuple[str, ...] = ("colour", "shape", "size", "count", "relation")


class Proposition(NamedTuple):
    """One atomic claim of a caption: its ``kind`` (one of :data:`KINDS`), its ``text`` and
    whether the image satisfies it."""

    kind: str
    text: str
    ok: bool


# --- checker ---------------------------------------------------------------------------------
_CHECK_RES = 128  # images above this are area-downsampled to it before checking
_MIN_RES = 64  # images below this are bilinearly upsampled to it (a 5-px circle is no shape)
_COLOUR_TOL = 0.2  # max RGB distance (in [0, 1]) from a palette colour for a pixel to count
_MIN_AREA = 0.003  # components below this fraction of the image are noise
_SIZE_SPLIT = 0.26  # bounding-box extent (fraction of the side) between small and large
_PALETTE = torch.tensor(list(COLOURS.values()))


@dataclass(frozen=True)
class _Blob:
    colour: str
    shape: str | None  # None: no shape of ours (e.g. elongated)
    size: str
    x: float
    y: float
    area: float


def _blobs(image: np.ndarray | Tensor, colours: list[str]) -> list[_Blob]:
    """Connected regions (8-connectivity) of pixels whose nearest palette colour is one of
    ``colours``, described by their bounding boxes (see :func:`score`)."""
    x = torch.as_tensor(image).detach().to("cpu", torch.float32)
    if x.ndim != 3 or x.shape[0] != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"alignment: expected one square (3, R, R) image, got shape {tuple(x.shape)}")
    x = (x + 1.0) / 2.0
    if x.shape[-1] > _CHECK_RES:
        x = F.interpolate(x[None], size=(_CHECK_RES, _CHECK_RES), mode="area")[0]
    elif x.shape[-1] < _MIN_RES:
        x = F.interpolate(x[None], size=(_MIN_RES, _MIN_RES), mode="bilinear", align_corners=False)[0]
    side = x.shape[-1]
    dist = torch.linalg.vector_norm(x[None] - _PALETTE[:, :, None, None], dim=1)  # (K, S, S)
    best, nearest = dist.min(0)
    wanted = torch.tensor([list(COLOURS).index(c) for c in colours])
    masks = (nearest[None] == wanted[:, None, None]) & (best < _COLOUR_TOL)  # (C, S, S)
    # Label propagation: each pixel takes the largest pixel id in its 3x3 neighbourhood until
    # nothing changes; a component ends up labelled with its largest id.
    ids = torch.arange(1, side * side + 1, dtype=torch.float32).view(1, side, side)
    labels = torch.where(masks, ids, 0.0)[:, None]
    fmask = masks[:, None].float()
    for _ in range(side * side):
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * fmask
        if torch.equal(grown, labels):
            break
        labels = grown
    keys = labels[:, 0].long() + torch.arange(len(colours))[:, None, None] * (side * side + 1)
    on = masks.flatten()
    keys = keys.flatten()[on]
    if keys.numel() == 0:
        return []
    pix = torch.arange(side * side).repeat(len(colours))[on]
    px, py = pix % side, pix // side
    uniq, inv, area = torch.unique(keys, return_inverse=True, return_counts=True)

    def reduce(v: Tensor, how: str) -> Tensor:
        init = torch.full((len(uniq),), side if how == "amin" else -1, dtype=torch.long)
        return init.scatter_reduce(0, inv, v, how)

    xmin, xmax, ymin, ymax = reduce(px, "amin"), reduce(px, "amax"), reduce(py, "amin"), reduce(py, "amax")
    # Share of each blob's area in the top and left halves of its box (a pixel on the middle
    # line counts half): ~1/2 for circles and squares, 1/4 or 3/4 for a triangle.
    halves = []
    for p, lo, hi in ((px, xmin, xmax), (py, ymin, ymax)):
        twice = 2 * p + 1 - (lo + hi + 1)[inv]  # twice the offset of the pixel centre from the box centre
        weight = (twice < 0).float() + 0.5 * (twice == 0).float()
        halves.append(torch.zeros(len(uniq)).index_add_(0, inv, weight) / area)
    lopsided = torch.maximum((halves[0] - 0.5).abs(), (halves[1] - 0.5).abs())
    blobs = []
    for j in range(len(uniq)):
        a = int(area[j])
        if a < _MIN_AREA * side * side:
            continue
        w, h = int(xmax[j] - xmin[j]) + 1, int(ymax[j] - ymin[j]) + 1
        fill = a / (w * h)
        shape: str | None
        if not 0.7 <= w / h <= 1 / 0.7:
            shape = None
        else:
            triangle = fill < 0.6 or float(lopsided[j]) > 0.12
            shape = "triangle" if triangle else "square" if fill >= 0.9 else "circle"
        blobs.append(
            _Blob(
                colour=colours[int(uniq[j]) // (side * side + 1)],
                shape=shape,
                size="large" if max(w, h) / side >= _SIZE_SPLIT else "small",
                x=(int(xmin[j]) + int(xmax[j]) + 1) / (2 * side),
                y=(int(ymin[j]) + int(ymax[j]) + 1) / (2 * side),
                area=a / (side * side),
            )
        )
    return blobs


def check(image: np.ndarray | Tensor, s: Scene) -> list[Proposition]:
    """The atomic propositions of ``caption(s)`` and whether ``image`` satisfies each.

    See :func:`score` for the definition. Useful to see *what* a generated image got wrong.
    """
    colours = list(dict.fromkeys(it.colour for it in s.items))
    blobs = _blobs(image, colours)
    props: list[Proposition] = []
    matched: list[_Blob | None] = []
    # A counted group is described once; other objects each have their own colour.
    for it in s.items[:1] if s.layout == "count" else s.items:
        mine = [b for b in blobs if b.colour == it.colour]
        # The blob that best matches the description stands for the object in relations.
        mine.sort(key=lambda b: (b.shape == it.shape, b.shape == it.shape and b.size == it.size, b.area))
        matched.append(mine[-1] if mine else None)
        props.append(Proposition("colour", f"something is {it.colour}", bool(mine)))
        props.append(Proposition("shape", f"the {it.colour} thing is a {it.shape}", any(b.shape == it.shape for b in mine)))
        good = [b for b in mine if b.shape == it.shape and b.size == it.size]
        props.append(Proposition("size", f"the {it.colour} {it.shape} is {it.size}", bool(good)))
        if s.layout == "count":
            n = len(s.items)
            props.append(Proposition("count", f"there are exactly {n} {it.size} {it.colour} {it.shape}s", len(good) == n))
    if s.layout == "relation" and s.relation is not None:
        a, b = matched
        holds = a is not None and b is not None and relation_holds(s.relation, (a.x, a.y), (b.x, b.y), 0.0)
        text = f"the {s.items[0].colour} thing is {s.relation} the {s.items[1].colour} thing"
        props.append(Proposition("relation", text, holds))
    return props


def score(image: np.ndarray | Tensor, s: Scene) -> float:
    """Alignment of ``image`` ((3, R, R) in [-1, 1]) with ``caption(s)``, in [0, 1]: the
    fraction of the caption's atomic propositions that the image satisfies (in the spirit of
    DSG, Cho et al. 2024, with a programmatic instead of a VQA judge). Positions are free: only
    what the caption says is checked, so any image of the caption can score 1.

    Definition. The image is area-downsampled to 128x128 if larger, bilinearly upsampled to
    64x64 if smaller (a small circle at 32x32 is ~5 px across: too few pixels to tell its
    shape from its box without smoothing). A pixel belongs to colour ``c`` when ``c`` is
    its nearest :data:`COLOURS` entry and lies within 0.2 (RGB distance, channels in [0, 1]).
    Each 8-connected region of one colour covering >= 0.3% of the image is a *blob*, described
    by its bounding box: shape = "triangle" if it fills < 60% of the box or one half of the box
    (top/bottom or left/right) holds < 38% of its area, else "square" if it fills >= 90%, else
    "circle" (none of them if the box's aspect ratio is outside [0.7, 1/0.7]); size = "large"
    if the box's longer side is >= 26% of the image side; position = the box's centre.
    Propositions, for each described object (or the counted group) of colour c, shape s and
    size z: (1) some blob is c; (2) some c blob is an s; (3) some c blob is an s of size z;
    for a count n: (4) exactly n c blobs are z s's. For a relation "A rel B": (5) with the
    best-matching blob of each (shape, then size, then area), the offset from B to A along
    the relation's axis has the right sign and exceeds the offset along the other axis.
    """
    props = check(image, s)
    return sum(p.ok for p in props) / len(props)


# --- metric ----------------------------------------------------------------------------------
class AlignmentConfig(ComponentConfig):
    """The alignment metric has no options: the checker's definition is fixed (see
    :func:`score`) so that numbers compare across runs."""


class AlignmentMetric:
    """Reports ``alignment`` (mean of per-image :func:`score`), ``alignment/all`` (share of
    images that satisfy every proposition: the grid's pass mark) and ``alignment/<kind>``
    (share of that kind's propositions satisfied, over all images; absent when no prompt
    states one). Prompts must carry their synthetic ``Scene`` (``EvalPrompt.scene``)."""

    needs_references = False

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._scores: list[float] = []
        self._kinds: dict[str, list[int]] = {k: [0, 0] for k in KINDS}  # kind -> [satisfied, stated]

    def update(
        self, images: Tensor, prompts: Sequence[EvalPrompt], references: Tensor | None = None
    ) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"alignment: {len(images)} images for {len(prompts)} prompts")
        out = []
        for image, prompt in zip(images, prompts):
            if not isinstance(prompt.scene, Scene):
                raise ValueError(
                    f"alignment: prompt {prompt.caption!r} carries no synthetic scene; the alignment "
                    "metric checks synthetic captions only (data: {type: synthetic})"
                )
            props = check(image, prompt.scene)
            for p in props:
                self._kinds[p.kind][0] += p.ok
                self._kinds[p.kind][1] += 1
            out.append(sum(p.ok for p in props) / len(props))
        self._scores.extend(out)
        return out

    def compute(self) -> dict[str, float]:
        if not self._scores:
            raise ValueError("alignment: no images were scored")
        res = {"alignment": float(np.mean(self._scores)),
               "alignment/all": float(np.mean([s == 1.0 for s in self._scores]))}
        res.update({f"alignment/{k}": ok / n for k, (ok, n) in self._kinds.items() if n})
        return res


def build_alignment(config: AlignmentConfig, *, device: Any = None) -> AlignmentMetric:
    """Factory of metric ``alignment`` (the checker runs on the CPU whatever ``device``)."""
    return AlignmentMetric()


@hookimpl
def vermeer_register(registry: Any) -> None:
    registry.add("metric", "alignment", build_alignment, AlignmentConfig)
