"""Does a spec's model learn its captions? A reproducible probe of issue 8 (item 3).

Two modes, both scored on held-out synthetic scenes (seed ``HELD_OUT_SEED``, never a training
stream's: run seeds are small) of the spec's own data configuration, with the synthetic
alignment checker (``vermeer_plugins.synthetic.score``: 1.0 for ground truth, ~0.06 for
mismatched captions):

* ``core SPEC [--set k=v ...] --steps N --out X.json``: train stage 0 (the 32 px Shallow-UViT
  core) alone with the spec's optimiser, EMA and data, and report every ``--eval-every`` steps
  the EMA model's alignment (samples at the spec's sampler, ``--guidance``, ``--sample-steps``),
  its v-MSE at t = 0.5 / 0.75 / 0.95 with the true captions and with shuffled ones (the gap is
  how much the caption is used).
* ``run RUN_DIR [--n 64]``: the same scores for every committed checkpoint of a ``vermeer run``
  (keep them with ``--set train.keep_checkpoints=10``; stage ends are always checkpointed).
* ``words CKPT [--n 128]``: which caption words the denoiser uses. For one-object scenes, the
  x0 MSE on object pixels at fixed log-SNRs with the true caption and with its shape, colour
  or size word swapped for another of its kind (one fixed noise draw). A word the model has
  learned raises the error when swapped.

Images below 64 px are nearest-upsampled to 64 px before scoring (the checker is reliable from
64 px). A study on 2 shared CPU cores: ``--threads 1`` per process, several in parallel.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from vermeer_core.checkpoint import Checkpointer
from vermeer_core.diffusion import LossWeight, TSampling, alpha_sigma, diffusion_loss, sample, target, to_x0
from vermeer_core.ema import EMA
from vermeer_core.inference import load_checkpoint
from vermeer_core.model import apply_phase, build_stage_model, stage_phases
from vermeer_core.optim import build_optimizer, lr_factor
from vermeer_core.plugins import get_registry
from vermeer_core.sampling import save_grid
from vermeer_core.spec import load_spec
from vermeer_plugins import alignment as align
from vermeer_plugins import synthetic as syn

HELD_OUT_SEED = 987_654


def held_out(config, n):
    scenes = [syn.scene(HELD_OUT_SEED, i, config) for i in range(n)]
    return scenes, [syn.caption(s) for s in scenes]


@torch.no_grad()
def alignment(model, spec, reg, scenes, captions, guidance, steps, bf16):
    """Mean checker score of EMA samples (one fixed generator) and the images."""
    res = model.resolution
    was = model.training
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        imgs = sample(model, captions, schedule=reg.build(spec.diffusion.schedule, "noise_schedule"),
                      sampler=reg.build(spec.sampling.sampler, "sampler"), resolution=res, steps=steps,
                      guidance=guidance, prediction=spec.diffusion.prediction,
                      generator=torch.Generator().manual_seed(1234), device="cpu").float()
    model.train(was)
    up = imgs if res >= 64 else F.interpolate(imgs, size=(64, 64), mode="nearest")
    checks = [align.check(im, s) for im, s in zip(up, scenes)]
    kinds = {}
    for props in checks:
        for p in props:
            kinds.setdefault(p.kind, []).append(p.ok)
    per_kind = {k: round(float(np.mean(v)), 3) for k, v in kinds.items()}
    return float(np.mean([np.mean([p.ok for p in props]) for props in checks])), imgs, per_kind


@torch.no_grad()
def vmse(model, spec, reg, scenes, captions, ts=(0.5, 0.75, 0.95), shuffle=False, bf16=False):
    """v-prediction MSE at fixed t (one fixed noise draw); ``shuffle`` pairs each image with
    the next scene's caption."""
    res = model.resolution
    schedule = reg.build(spec.diffusion.schedule, "noise_schedule")
    x0 = torch.stack([torch.from_numpy(syn.render(s, res)) for s in scenes])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    caps = captions[1:] + captions[:1] if shuffle else list(captions)
    was = model.training
    model.eval()
    out = {}
    for t in ts:
        lam = schedule.logsnr(torch.full((len(caps),), t), res)
        a, s = alpha_sigma(lam)
        xt = a[:, None, None, None] * x0 + s[:, None, None, None] * eps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = model(xt, lam, caps).float()
        out[str(t)] = round(float(((pred - target(x0, eps, a, s, "v")) ** 2).mean()), 4)
    model.train(was)
    return out


def scores(model, spec, reg, n, guidances, steps, bf16, grid=None):
    scenes, caps = held_out(spec.data, n)
    rec = {}
    for g in guidances:
        rec[f"align_g{g}"], imgs, rec[f"props_g{g}"] = alignment(model, spec, reg, scenes, caps, g, steps, bf16)
        rec[f"align_g{g}"] = round(rec[f"align_g{g}"], 3)
        if grid:
            save_grid(imgs[:36], caps[:36], grid.format(g=g))
    rec["vmse"] = vmse(model, spec, reg, scenes[:32], caps[:32], bf16=bf16)
    rec["vmse_shuffled"] = vmse(model, spec, reg, scenes[:32], caps[:32], shuffle=True, bf16=bf16)
    return rec


def core(a):
    reg = get_registry()
    spec = load_spec(a.spec, reg, a.set)
    res, batch = spec.stages[0].resolution, spec.stages[0].batch_size
    model = build_stage_model(spec, reg, 0)
    trainable = apply_phase(model, stage_phases(spec, reg, 0)[0])
    o = spec.optim
    opt = build_optimizer(model, trainable, {}, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    ema = EMA(model, spec.ema.decay, power=spec.ema.warmup_power)
    schedule = reg.build(spec.diffusion.schedule, "noise_schedule")
    data = iter(reg.build(spec.data, "dataset", resolution=res, batch_size=batch, rank=0, world_size=1, seed=spec.seed))
    params = [p for n, p in model.named_parameters() if n in trainable]
    bf16 = spec.train.precision == "bf16"
    log, losses, train_s = {"spec": a.spec, "set": a.set, "evals": []}, [], 0.0
    for step in range(a.steps):
        t0 = time.perf_counter()
        b = next(data)
        for g in opt.param_groups:
            g["lr"] = o.lr * lr_factor(step, a.steps, o.warmup_steps, o.decay)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(model, b.images, b.captions, schedule=schedule, resolution=res,
                                  prediction=spec.diffusion.prediction, cond_drop=spec.diffusion.cond_drop,
                                  generator=torch.Generator().manual_seed(10_000 + step),
                                  t_sampling=TSampling(**spec.diffusion.t_sampling.model_dump()),
                                  loss_weight=LossWeight(**spec.diffusion.loss_weight.model_dump()))
        loss.backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, trainable)
        train_s += time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            with ema.swapped_in(model):
                rec = {"step": step + 1, "images": (step + 1) * batch, "train_s": round(train_s, 1),
                       "loss": round(float(np.mean(losses[-20:])), 4),
                       **scores(model, spec, reg, a.n, a.guidance or [spec.sampling.guidance],
                                a.sample_steps or spec.sampling.steps, bf16,
                                f"{a.grid}_s{step + 1}_g{{g}}.png" if a.grid else None)}
            print(json.dumps(rec), flush=True)
            log["evals"].append(rec)
            with open(a.out, "w") as f:
                json.dump(log, f)
    if a.save:
        with ema.swapped_in(model):
            torch.save(model.state_dict(), a.save)


def run(a):
    reg = get_registry()
    ck = Checkpointer(a.run_dir, keep=10**6)
    for url in ck.committed():
        if a.only and url.rsplit("/", 1)[-1] not in a.only:
            continue
        spec, model, stage = load_checkpoint(url, reg)
        grid = f"{a.grid}_stage{stage}_{model.resolution}px_g{{g}}.png" if a.grid else None
        rec = {"checkpoint": url.rsplit("/", 1)[-1], "stage": stage, "resolution": model.resolution,
               **scores(model, spec, reg, a.n, a.guidance or [spec.sampling.guidance],
                        a.sample_steps or spec.sampling.steps, spec.train.precision == "bf16", grid)}
        print(json.dumps(rec), flush=True)


WORDS_SEED = 4321


@torch.no_grad()
def words(a):
    """The x0 MSE on object pixels with the true caption and one word swapped (see the module
    docstring); one-object scenes only (``data.max_objects: 1``)."""
    import dataclasses
    import random

    reg = get_registry()
    spec, model, _ = load_checkpoint(a.checkpoint, reg)
    model.eval()
    res = model.resolution
    scenes = [syn.scene(WORDS_SEED, i, spec.data) for i in range(a.n)]
    if any(len(s.items) != 1 for s in scenes):
        raise SystemExit("words: needs one object per scene (data.max_objects: 1)")
    x0 = torch.stack([torch.from_numpy(syn.render(s, res)) for s in scenes])
    # object pixels: those that differ from the (plain) background in the top-left corner
    obj = ((x0 - x0[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.3).float()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rng = random.Random(0)
    others = {"shape": list(syn.SHAPES), "colour": list(syn.COLOURS), "size": ["small", "large"]}

    def caption(s, kind):
        if kind == "true":
            return syn.caption(s)
        it = s.items[0]
        new = rng.choice([w for w in others[kind] if w != getattr(it, kind)])
        return syn.caption(dataclasses.replace(s, items=(dataclasses.replace(it, **{kind: new}),)))

    for lam in a.logsnr:
        al, si = alpha_sigma(torch.tensor(float(lam)))
        xt = al * x0 + si * eps
        row = {"logsnr": lam}
        for kind in ("true", "shape", "colour", "size"):
            v = model(xt, torch.full((a.n,), float(lam)), [caption(s, kind) for s in scenes])
            err = (to_x0(v.float(), xt, al, si, spec.diffusion.prediction) - x0) ** 2
            row[kind] = round(float((err * obj).sum() / (obj.sum() * 3)), 5)
        print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("core")
    c.add_argument("spec")
    c.add_argument("--set", action="append", default=[])
    c.add_argument("--steps", type=int, default=300)
    c.add_argument("--eval-every", type=int, default=150)
    c.add_argument("--out", required=True)
    c.add_argument("--save", help="write the EMA model's state_dict here at the end")
    r = sub.add_parser("run")
    r.add_argument("run_dir")
    r.add_argument("--only", nargs="+", help="checkpoint names to score (e.g. step-00000500); default all")
    w = sub.add_parser("words")
    w.add_argument("checkpoint", help="a checkpoint directory or run directory (its newest checkpoint)")
    w.add_argument("--n", type=int, default=128, help="held-out one-object scenes")
    w.add_argument("--logsnr", type=float, nargs="+", default=[-4.0, -2.0, 0.0, 2.0, 4.0])
    w.add_argument("--threads", type=int, default=1)
    for p in (c, r):
        p.add_argument("--grid", help="PNG prefix for sample grids (first 36 prompts)")
        p.add_argument("--n", type=int, default=64, help="held-out prompts")
        p.add_argument("--guidance", type=float, nargs="+")
        p.add_argument("--sample-steps", type=int)
        p.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    {"core": core, "run": run, "words": words}[a.mode](a)


if __name__ == "__main__":
    main()
