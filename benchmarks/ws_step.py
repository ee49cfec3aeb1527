"""Step time and per-rank memory of the engine's train step at one world size (run by torchrun).

    torchrun --nproc-per-node N benchmarks/ws_step.py OUT.json [--steps 5] [--resolution 32]

Every rank builds a quickstart stage (:mod:`specs/quickstart.yaml`), shards it with the
engine's :func:`~vermeer_core.distributed.parallelize` (each FSDP2 variant below in turn), and
times :class:`~vermeer_core.step.TrainStep` on the stage's global batch split over the ranks,
with a barrier and a device read closing each timed block (so a step's queued work is in its
time); the variants are timed in interleaved rounds, so a shared machine's drift lands on all
alike. Memory per rank: the resident-set high-water mark (``VmHWM``) after the first
variant's warm-up (later variants' peaks would include the earlier ones' models) and the
bytes of each variant's parameter and optimizer shards.
Rank 0 writes one JSON object: ``{"world_size": N, "variants": [...]}``. Used by
``test_baselines.py::test_world_sizes``; standalone for a quick look.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from vermeer_core.distributed import end_process, init_distributed, parallelize, shutdown
from vermeer_core.ema import EMA
from vermeer_core.model import apply_phase, build_stage_model, stage_phases
from vermeer_core.optim import build_optimizer
from vermeer_core.plugins import get_registry
from vermeer_core.spec import parse_spec
from vermeer_core.step import TrainStep, make_loss_fn

ROOT = Path(__file__).resolve().parents[1]
#: (name, reshard_after_forward, prefetch): FSDP2 settings compared at world size > 1
VARIANTS = [("reshard+implicit-prefetch", True, 0), ("reshard+prefetch-1", True, 1),
            ("no-reshard", False, 0)]


def vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def local_bytes(tensors: Any) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    args = ap.parse_args()
    d = init_distributed(device="auto")
    reg = get_registry()
    spec = parse_spec(yaml.safe_load((ROOT / "specs" / "quickstart.yaml").read_text()), reg, "quickstart")
    stage = [s.resolution for s in spec.stages].index(args.resolution)
    st = spec.stages[stage]
    phase = stage_phases(spec, reg, stage)[-1]
    data = reg.build(spec.data, "dataset", resolution=st.resolution, batch_size=st.batch_size // d.world_size,
                     rank=d.rank, world_size=d.world_size, seed=0)
    batch = next(iter(data))
    chosen = [v for v in VARIANTS if v[0] in args.variants.split(",")]
    if d.world_size == 1:
        chosen = chosen[:1]  # nothing to shard: the settings do not apply
    built = []
    hwm_first = None
    for name, reshard, prefetch in chosen:
        torch.manual_seed(0)
        prev = None
        for k in range(stage + 1):  # grow up to the stage, as the engine's chain does
            prev = build_stage_model(spec, reg, k, prev)
        model = prev.to(d.device)  # type: ignore[union-attr]
        parallelize(model, d.mesh, bf16=spec.train.precision == "bf16" and d.device.type == "cuda",
                    reshard_after_forward=reshard, prefetch=prefetch)
        names = apply_phase(model, phase)
        opt = build_optimizer(model, names, {}, lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
        step = TrainStep(
            model=model, ema=EMA(model, 0.999), opt=opt, trainable=names,
            loss_fn=make_loss_fn(schedule=reg.build(spec.diffusion.schedule, "noise_schedule"),
                                 resolution=st.resolution, prediction=spec.diffusion.prediction,
                                 cond_drop=spec.diffusion.cond_drop),
            lr_at=lambda s: 1e-4, first=0, seed=0, grad_clip=1.0, device=d.device, rank=d.rank,
            world_size=d.world_size, local_batch=st.batch_size // d.world_size,
            autocast_bf16=spec.train.precision == "bf16" and d.device.type == "cpu",
        )
        for _ in range(2):
            step(batch)
        if hwm_first is None:  # only the first variant's peak is its own (the others add to it)
            hwm_first = vm_hwm_bytes() or 0
        built.append((name, reshard, prefetch, model, opt, step))
    # Interleaved rounds (the variants take turns, each round starting elsewhere): a shared
    # machine's drift lands on all alike.
    times: dict[str, list[float]] = {b[0]: [] for b in built}
    for rnd in range(args.steps):
        for name, _, _, _, _, step in built[rnd % len(built):] + built[: rnd % len(built)]:
            dist.barrier()
            t0 = time.perf_counter()
            r = step(batch)
            float(r.loss)  # the step's device work is done
            dist.barrier()
            times[name].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for i, (name, reshard, prefetch, model, opt, step) in enumerate(built):
        mem = torch.tensor([hwm_first if i == 0 else 0, local_bytes(model.parameters()),
                            local_bytes(t for s in opt.state.values() for t in s.values())], dtype=torch.float64)
        mems = [torch.zeros_like(mem) for _ in range(d.world_size)]
        dist.all_gather(mems, mem)
        t = times[name]
        rows.append({
            "variant": name, "reshard_after_forward": reshard, "prefetch": prefetch,
            "world_size": d.world_size, "resolution": st.resolution, "global_batch": st.batch_size,
            "ms": statistics.median(t), "ms_min": min(t), "ms_max": max(t), "repeats": len(t),
            "rss_hwm_bytes_per_rank": [int(m[0]) for m in mems] if i == 0 else None,
            "param_bytes_per_rank": [int(m[1]) for m in mems],
            "optim_bytes_per_rank": [int(m[2]) for m in mems],
        })
    if d.rank == 0:
        Path(args.out).write_text(json.dumps({"world_size": d.world_size, "variants": rows}, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
    end_process(0)
