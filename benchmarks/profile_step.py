"""torch.profiler table of the engine's core step (quickstart stage 0, batch 8, CPU, FSDP2 world
of one, :class:`~vermeer_core.step.TrainStep`): 2 warm-up steps, 3 profiled.

    python benchmarks/profile_step.py fp32|bf16
"""

import sys
from pathlib import Path

import torch
import yaml
from torch.profiler import profile, ProfilerActivity
from vermeer_core.plugins import get_registry
from vermeer_core.spec import parse_spec
from vermeer_core.model import build_stage_model, apply_phase, stage_phases
from vermeer_core.optim import build_optimizer
from vermeer_core.ema import EMA
from vermeer_core.step import TrainStep, make_loss_fn
from vermeer_core.distributed import init_distributed, parallelize, shutdown
bf16 = len(sys.argv) > 1 and sys.argv[1] == "bf16"
d = init_distributed(device="cpu")
reg = get_registry()
spec = parse_spec(yaml.safe_load((Path(__file__).resolve().parents[1] / "specs" / "quickstart.yaml").read_text()), reg, "q")
model = build_stage_model(spec, reg, 0)
parallelize(model, d.mesh)
names = apply_phase(model, stage_phases(spec, reg, 0)[-1])
opt = build_optimizer(model, names, {}, lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
ts = TrainStep(model=model, ema=EMA(model, 0.999), opt=opt, trainable=names,
    loss_fn=make_loss_fn(schedule=reg.build(spec.diffusion.schedule, "noise_schedule"), resolution=32, prediction=spec.diffusion.prediction, cond_drop=spec.diffusion.cond_drop),
    lr_at=lambda s: 1e-4, first=0, seed=0, grad_clip=1.0, device=d.device, rank=0, world_size=1, local_batch=8, autocast_bf16=bf16)
data = reg.build(spec.data, "dataset", resolution=32, batch_size=8, rank=0, world_size=1, seed=0)
b = next(iter(data))
for _ in range(2): ts(b)
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(3): ts(b)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=45))
shutdown()
