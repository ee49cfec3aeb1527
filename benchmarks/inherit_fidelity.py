"""How close ``greedy`` + ``init: inherit`` starts to the previous stage (issue 8 item 4).

Loads the trained stage-0 model of a finished run, grows stage 1 from it with ``init: fresh``
and ``init: inherit`` (the spec's model, the growth policy's transfers applied to the trained
tensors, as the engine does), and reports on noisy 64-px images of the run's own data, at
log-SNRs of the stage-1 schedule (t = 0.1, 0.3, 0.5, 0.7, 0.9):

* ``rel_err``: ||grown(x_t) - up(prev(down(x_t)))|| / ||up(prev(down(x_t)))||, the same λ
  given to both (what the grown model can compute: both share the conditioning module);
* ``rel_err_2x2``: the same against prev's output averaged over 2x2 blocks (what the
  architecture can represent, see vermeer_plugins.inherit): exact up to float error;
* ``vmse``: the grown model's v-MSE on the stage-1 training target, and prev's own v-MSE
  at 32 px on the pooled images at its own schedule's λ (same t), for scale.

    python benchmarks/inherit_fidelity.py RUN_DIR     # RUN_DIR: a run of a 2-stage greedy spec
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from vermeer_core.diffusion import alpha_sigma
from vermeer_core.inference import load_checkpoint
from vermeer_core.model import VermeerModel, build_stage_model, stage_transfers
from vermeer_core.plugins import get_registry


def grow_with_weights(spec, reg, prev: VermeerModel, init: str) -> VermeerModel:
    """Stage 1 grown from the trained ``prev`` with ``init``, its transfers applied."""
    stage = spec.stages[1].model_copy(update={"growth": spec.stages[1].growth.model_copy(update={"init": init})})
    data = spec.model_copy(update={"stages": [spec.stages[0], stage, *spec.stages[2:]]})
    grown = build_stage_model(data, reg, 1, prev=prev)
    plan = stage_transfers(grown, prev, 1)
    src = prev.state_dict()
    state = grown.state_dict()
    for name, t in plan.items():
        state[name] = t.fn(*(src[s] for s in t.sources)) if t.fn else src[t.sources[0]].clone()
    grown.load_state_dict(state)
    return grown.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--weights", default="ema", choices=("ema", "model"))
    args = p.parse_args(argv)
    reg = get_registry()
    ckpts = sorted((__import__("pathlib").Path(args.run) / "checkpoints").glob("step-*"))
    stage0 = None
    for c in ckpts:
        spec, model, stage = load_checkpoint(str(c), reg, weights=args.weights)
        if stage == 0:
            stage0 = (spec, model.eval())
    if stage0 is None:
        print("no stage-0 checkpoint in the run", file=sys.stderr)
        return 1
    spec, prev = stage0
    res = spec.stages[1].resolution
    stream = reg.build(spec.data, "dataset", resolution=res, batch_size=args.batch, rank=0, world_size=1,
                       seed=999)
    batch = next(iter(stream))
    schedule = reg.build(spec.diffusion.schedule, "noise_schedule")
    g = torch.Generator().manual_seed(0)
    out: dict[str, list] = {"fresh": [], "inherit": []}
    for init in out:
        grown = grow_with_weights(spec, reg, prev, init)
        for t in (0.1, 0.3, 0.5, 0.7, 0.9):
            tt = torch.full((args.batch,), t)
            lam = schedule.logsnr(tt, res)
            a, s = (v[:, None, None, None] for v in alpha_sigma(lam))
            eps = torch.randn(batch.images.shape, generator=g)
            x_t = a * batch.images + s * eps
            with torch.no_grad():
                text = prev.encode_text(batch.captions)
                small = prev(F.avg_pool2d(x_t, 2), lam, text)
                target = F.interpolate(small, scale_factor=2, mode="nearest")
                blocky = F.interpolate(F.avg_pool2d(small, 2), scale_factor=4, mode="nearest")
                got = grown(x_t, lam, text)
                # prev on its own terms: pooled clean images noised at its schedule's λ(t)
                lam0 = schedule.logsnr(tt, res // 2)
                a0, s0 = (v[:, None, None, None] for v in alpha_sigma(lam0))
                x0 = F.avg_pool2d(batch.images, 2)
                e0 = torch.randn(x0.shape, generator=g)
                prev_vmse = (prev(a0 * x0 + s0 * e0, lam0, text) - (a0 * e0 - s0 * x0)).square().mean()
            v = a * eps - s * batch.images
            out[init].append({
                "t": t, "logsnr": float(lam[0]),
                "rel_err": float((got - target).norm() / target.norm()),
                "rel_err_2x2": float((got - blocky).norm() / blocky.norm()),
                "vmse": float((got - v).square().mean()), "zero_vmse": float(v.square().mean()),
                "prev_vmse_own_terms": float(prev_vmse),
            })
    print(json.dumps(out, indent=2))
    print("| init | t | λ | rel err vs up(prev(down x)) | vs 2x2 mean | v-MSE grown | v-MSE of 0 | prev v-MSE at 32 px |")
    print("|---|---|---|---|---|---|---|---|")
    for init, rows in out.items():
        for r in rows:
            print(f"| {init} | {r['t']} | {r['logsnr']:.2f} | {r['rel_err']:.3f} | {r['rel_err_2x2']:.2e} | "
                  f"{r['vmse']:.4f} | {r['zero_vmse']:.4f} | {r['prev_vmse_own_terms']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
