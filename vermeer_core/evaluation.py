"""Evaluation: generate images for held-out prompts and score them with ``metric`` components.

Shared by the engine (a spec's ``eval:`` runs at the end of every stage) and ``vermeer eval``.
Prompts come from the dataset (its optional ``eval_prompts`` / ``eval_references``, see
:mod:`vermeer_core.interfaces`), so they follow the run's own data configuration; images are
generated with the spec's sampler, chunk by chunk, each chunk with its own seed so the result
does not depend on the chunk size used elsewhere.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel
from torch import Tensor, nn

from vermeer_core.errors import VermeerError
from vermeer_core.interfaces import EvalPrompt, Metric
from vermeer_core.io import atomic_write_bytes, atomic_write_text
from vermeer_core.registry import Registry

__all__ = [
    "EvalError", "EvalResult", "build_metrics", "check_eval", "eval_source", "evaluate", "generate_eval",
    "save_marked_grid", "score", "write_result",
]


class EvalError(VermeerError):
    """Evaluation cannot run as asked (e.g. the dataset has no held-out prompts)."""


@dataclass
class EvalResult:
    """What one evaluation produced: the images, per-image scores and the metrics' numbers."""

    prompts: list[EvalPrompt]
    images: Tensor  # (N, 3, R, R) in [-1, 1]
    metrics: dict[str, float] = field(default_factory=dict)
    per_image: dict[str, list[float]] = field(default_factory=dict)  # metric name -> one score per image
    seconds: dict[str, float] = field(default_factory=dict)  # "generate", "score"


def eval_source(spec: Any, registry: Registry, resolution: int) -> Any:
    """The run's dataset at ``resolution``, asked only for held-out prompts (and references)."""
    data = registry.build(spec.data, "dataset", resolution=resolution, batch_size=1, rank=0, world_size=1,
                          seed=spec.seed)
    if not callable(getattr(data, "eval_prompts", None)):
        raise EvalError(
            f"dataset {spec.data.type!r} offers no held-out prompts (no eval_prompts method); evaluation "
            "needs a dataset that does, e.g. data: {type: synthetic}"
        )
    return data


@torch.no_grad()
def generate_eval(
    model: nn.Module, prompts: Sequence[EvalPrompt], *, spec: Any, schedule: Any, sampler: Any, resolution: int,
    device: torch.device, seed: int, steps: int | None = None, guidance: float | None = None, batch_size: int = 16,
    rank: int = 0, world_size: int = 1,
) -> Tensor:
    """Images for ``prompts`` (chunk i sampled with seed ``seed + i``), on the CPU in [-1, 1].
    Every rank must call this; each samples its share of every chunk and gets all images
    (see :func:`vermeer_core.sampling.generate`)."""
    from vermeer_core.sampling import generate

    captions = [p.caption for p in prompts]
    chunks = [
        generate(model, captions[i : i + batch_size], spec=spec, schedule=schedule, sampler=sampler,
                 resolution=resolution, device=device, steps=steps, guidance=guidance, seed=seed + i // batch_size,
                 rank=rank, world_size=world_size)
        for i in range(0, len(captions), batch_size)
    ]
    return torch.cat(chunks)


def build_metrics(refs: Sequence[Any], registry: Registry, device: torch.device) -> list[tuple[str, Metric]]:
    """(name, metric) for each reference (a validated config, or a ``{type: ...}`` mapping)."""
    out = []
    for ref in refs:
        if not isinstance(ref, BaseModel):
            ref = registry.parse("metric", ref)
        out.append((ref.type, registry.build(ref, "metric", device=device)))
    return out


def score(
    images: Tensor, prompts: Sequence[EvalPrompt], metrics: Sequence[tuple[str, Metric]], *, source: Any,
    batch_size: int = 16,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Run ``metrics`` over ``images`` in batches; references from ``source`` (the dataset)
    when a metric needs them. Returns (numbers, per-image scores by metric name)."""
    resolution = images.shape[-1]
    need_refs = any(m.needs_references for _, m in metrics)
    if need_refs and not callable(getattr(source, "eval_references", None)):
        names = [n for n, m in metrics if m.needs_references]
        raise EvalError(f"metrics {names} need reference images, which this dataset does not provide")
    for _, m in metrics:
        m.reset()
    per_image: dict[str, list[float]] = {}
    for i in range(0, len(prompts), batch_size):
        chunk, batch = prompts[i : i + batch_size], images[i : i + batch_size]
        refs = source.eval_references(chunk, resolution) if need_refs else None
        for name, m in metrics:
            scores = m.update(batch, chunk, refs)
            if scores is not None:
                per_image.setdefault(name, []).extend(float(s) for s in scores)
    numbers: dict[str, float] = {}
    for _, m in metrics:
        numbers.update(m.compute())
    return numbers, per_image


def save_marked_grid(images: Tensor, passed: Sequence[bool | None], url: str, border: int = 2) -> None:
    """A grid PNG where each image has a border: green = passes (every proposition of its
    prompt holds), red = fails, grey = not judged."""
    from vermeer_core.sampling import to_uint8

    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    cell_h, cell_w = h + 2 * border, w + 2 * border
    grid = np.full((rows * (cell_h + 2) + 2, cols * (cell_w + 2) + 2, 3), 255, np.uint8)
    colours = {True: (0, 170, 0), False: (220, 0, 0), None: (150, 150, 150)}
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = 2 + r * (cell_h + 2), 2 + c * (cell_w + 2)
        grid[y : y + cell_h, x : x + cell_w] = colours[passed[i]]
        grid[y + border : y + border + h, x + border : x + border + w] = arr[i]
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(url, buf.getvalue())


def write_result(result: EvalResult, json_url: str, grid_url: str, info: dict[str, Any]) -> dict[str, Any]:
    """Write the numbers (JSON: ``info``, metrics, one entry per prompt) and the marked grid
    (plus a ``.txt`` beside it listing the prompts in reading order). Returns the JSON record."""
    scores = result.per_image.get("alignment") or next(iter(result.per_image.values()), None)
    passed: list[bool | None] = [s == 1.0 for s in scores] if scores else [None] * len(result.prompts)
    record = {
        **info,
        "prompts": len(result.prompts),
        "metrics": result.metrics,
        "seconds": result.seconds,
        "per_prompt": [
            {"caption": p.caption, **{name: v[i] for name, v in result.per_image.items()}}
            for i, p in enumerate(result.prompts)
        ],
    }
    atomic_write_text(json_url, json.dumps(record, indent=2) + "\n")
    save_marked_grid(result.images, passed, grid_url)
    marks = {True: "pass", False: "FAIL", None: "-"}
    text = "".join(f"{i}: [{marks[ok]}] {p.caption}\n" for i, (p, ok) in enumerate(zip(result.prompts, passed)))
    atomic_write_text(grid_url.rsplit(".", 1)[0] + ".txt", text)
    return record


def check_eval(spec: Any, registry: Registry, resolution: int) -> None:
    """Fail before training, not after it, when the spec's ``eval:`` cannot run: the dataset
    has no held-out prompts, a metric cannot load (missing package) or rejects the data. Runs
    every metric on two ground-truth images (or prompts without images when no references)."""
    e = spec.eval
    if e is None:
        return
    source = eval_source(spec, registry, resolution)
    metrics = build_metrics(e.metrics, registry, torch.device("cpu"))
    prompts = source.eval_prompts(2, e.seed)
    if not callable(getattr(source, "eval_references", None)):
        return  # score() names the metrics that need references
    try:
        score(source.eval_references(prompts, resolution), prompts, metrics, source=source)
    except ValueError as exc:
        raise EvalError(f"eval.metrics cannot score this run's data: {exc}") from None


def evaluate(
    model: nn.Module, *, spec: Any, registry: Registry, metrics: Sequence[Any], n: int, seed: int, resolution: int,
    schedule: Any, sampler: Any, device: torch.device, steps: int | None = None, guidance: float | None = None,
    batch_size: int = 16, rank0: bool = True, rank: int = 0, world_size: int = 1,
) -> EvalResult | None:
    """Generate for ``n`` held-out prompts (each rank its share, gathered) and score them (rank
    0 only: other ranks return None). ``metrics`` are metric configs or ``{type: ...}`` mappings."""
    source = eval_source(spec, registry, resolution)
    prompts = source.eval_prompts(n, seed)
    t0 = time.perf_counter()
    images = generate_eval(model, prompts, spec=spec, schedule=schedule, sampler=sampler, resolution=resolution,
                           device=device, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size,
                           rank=rank, world_size=world_size)
    t1 = time.perf_counter()
    if not rank0:
        return None
    built = build_metrics(metrics, registry, device)
    numbers, per_image = score(images, prompts, built, source=source, batch_size=batch_size)
    seconds = {"generate": t1 - t0, "score": time.perf_counter() - t1}
    return EvalResult(list(prompts), images, numbers, per_image, seconds)
