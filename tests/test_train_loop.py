"""A tiny model learns: a plain training loop over the synthetic dataset lowers the loss."""

from __future__ import annotations

import torch
from tiny_model_spec import tiny_spec

from vermeer_core.diffusion import diffusion_loss
from vermeer_core.model import VermeerModel, apply_phase, build_stage_model, stage_phases
from vermeer_core.plugins import get_registry

RESOLUTION = 32


def held_out_loss(model: VermeerModel, images: torch.Tensor, captions: list[str], schedule) -> float:
    """Loss on a fixed batch with fixed noise: the same number before and after unless the
    weights changed."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        losses = [
            diffusion_loss(model, images, captions, schedule=schedule, resolution=RESOLUTION,
                           prediction="v", cond_drop=0.0, generator=gen)
            for _ in range(4)
        ]
    return float(torch.stack(losses).mean())


def test_loss_falls_over_a_few_dozen_steps() -> None:
    reg = get_registry()
    spec = tiny_spec((RESOLUTION,), growth={"type": "greedy", "phases": [{"name": "core", "steps": 40}]})
    model = build_stage_model(spec, reg, 0)
    (phase,) = stage_phases(spec, reg, 0)
    trainable = apply_phase(model, phase)
    schedule_cfg = reg.parse("noise_schedule", {"type": "shifted-cosine", "base_resolution": RESOLUTION})
    schedule = reg.build(schedule_cfg, "noise_schedule")
    data = reg.build(reg.parse("dataset", {"type": "synthetic"}), "dataset",
                     resolution=RESOLUTION, batch_size=8, rank=0, world_size=1, seed=0)
    held_out = reg.build(reg.parse("dataset", {"type": "synthetic", "seed_offset": 1}), "dataset",
                         resolution=RESOLUTION, batch_size=8, rank=0, world_size=1, seed=0)
    eval_batch = next(iter(held_out))
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n in trainable], lr=5e-3)
    gen = torch.Generator().manual_seed(0)

    before = held_out_loss(model, eval_batch.images, eval_batch.captions, schedule)
    for _, batch in zip(range(phase.steps), data):
        loss = diffusion_loss(model, batch.images, batch.captions, schedule=schedule, resolution=RESOLUTION,
                              prediction="v", cond_drop=0.1, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    after = held_out_loss(model, eval_batch.images, eval_batch.captions, schedule)
    assert after < 0.9 * before, (before, after)
