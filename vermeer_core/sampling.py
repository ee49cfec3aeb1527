"""Generating images from a model, sample grids and the loss plot (PNG files)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn

from vermeer_core.diffusion import BatchRows, Grid, sample
from vermeer_core.interfaces import SamplerCallback
from vermeer_core.io import atomic_write_bytes, atomic_write_text

__all__ = ["generate", "shard_rows", "to_uint8", "save_png", "save_grid", "plot_losses"]


@torch.no_grad()
def generate(
    model: nn.Module, prompts: Sequence[str], *, spec: Any, schedule: Any, sampler: Any, resolution: int,
    device: torch.device, steps: int | None = None, guidance: float | None = None, seed: int | None = None,
    grid: Grid | None = None, callback: SamplerCallback | None = None, rank: int = 0, world_size: int = 1,
) -> Tensor:
    """Images for ``prompts`` with the spec's sampling settings (overridable), in [-1, 1];
    ``callback`` is called once per sampler step (:data:`~vermeer_core.interfaces.SamplerCallback`).

    With ``world_size`` > 1 every rank must call this: each samples its share of the prompts
    (:func:`shard_rows`) and all ranks return all images, gathered in prompt order. Every
    image's noise is its row of the whole batch's draws from one generator (:class:`BatchRows`),
    so the images equal world size 1's up to float rounding (batch shapes differ)."""
    s = spec.sampling
    gen = torch.Generator(device=device).manual_seed(s.seed if seed is None else seed)
    n = len(prompts)
    rows = shard_rows(n, rank, world_size)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.train.precision == "bf16" and device.type == "cpu"):
            out = sample(
                model, [prompts[i] for i in rows], schedule=schedule, sampler=sampler, resolution=resolution,
                steps=steps or s.steps, guidance=s.guidance if guidance is None else guidance,
                prediction=spec.diffusion.prediction, generator=BatchRows(gen, n, rows) if world_size > 1 else gen,
                device=device, grid=grid or s.grid, callback=callback,
            )
    finally:
        model.train(was_training)
    if world_size > 1:
        parts = [torch.empty_like(out) for _ in range(world_size)]
        dist.all_gather(parts, out.contiguous())  # on the device: NCCL gathers CUDA tensors only
        out = torch.cat(parts)[:n]
    return out.float().cpu()


def shard_rows(n: int, rank: int, world_size: int) -> tuple[int, ...]:
    """Rank ``rank``'s share of ``n`` prompts: a contiguous block of ``ceil(n / world_size)``,
    padded with the last prompt so that every rank runs the same forwards (FSDP gathers
    parameters in each one); concatenated in rank order and cut to ``n``, the blocks are the
    prompts in order."""
    share = -(-n // world_size)
    return tuple(min(rank * share + j, n - 1) for j in range(share))


def to_uint8(images: Tensor) -> np.ndarray:
    """(B,3,H,W) in [-1,1] -> (B,H,W,3) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Tensor, url: str) -> None:
    """One (3,H,W) image in [-1,1] as a PNG at ``url`` (any fsspec URL), written atomically."""
    atomic_write_bytes(url, _png(to_uint8(image[None])[0]))


def save_grid(images: Tensor, prompts: Sequence[str], url: str, pad: int = 2) -> None:
    """A grid PNG of ``images`` and, beside it (``.txt``), their prompts in reading order."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    atomic_write_bytes(url, _png(grid))
    text = "".join(f"{i}: {p}\n" for i, p in enumerate(prompts))
    atomic_write_text(url.rsplit(".", 1)[0] + ".txt", text)


def plot_losses(metrics_url: str, out_url: str) -> None:
    """Loss against step from ``metrics.jsonl``, one colour per stage (matplotlib, Agg); when
    the run has evaluation records (``eval/...``), a companion panel on the right shows the
    alignment (overall and per proposition kind) at the end of each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with fsspec.open(metrics_url, "r") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    records = [r for r in lines if "loss" in r]
    evals = [r for r in lines if any(k.startswith("eval/alignment") for k in r)]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if evals:
        _plot_alignment(axes[0][1], evals)
    stages = sorted({r["stage"] for r in records})
    for k in stages:
        pts = [(r["step"], r["loss"]) for r in records if r["stage"] == k]
        res = next(r["resolution"] for r in records if r["stage"] == k)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"stage {k} ({res}px)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out_url, buf.getvalue())


def _plot_alignment(ax: Any, evals: list[dict[str, Any]]) -> None:
    """Alignment per stage (x: stage and resolution), overall bold, per kind thin."""
    evals = sorted(evals, key=lambda r: r["stage"])
    xs = list(range(len(evals)))
    keys = sorted({k for r in evals for k in r if k.startswith("eval/alignment/") and k != "eval/alignment/all"})
    for key in ["eval/alignment", *keys]:
        ys = [r.get(key, float("nan")) for r in evals]
        main = key == "eval/alignment"
        ax.plot(xs, ys, marker="o", lw=2.5 if main else 1, alpha=1 if main else 0.7,
                label="alignment" if main else key.rsplit("/", 1)[1])
    ax.set_xticks(xs, [f"stage {r['stage']}\n{r['resolution']}px" for r in evals])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("held-out alignment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
