"""Usage: python benchmarks/eval_cost.py N (held-out prompts). Per quickstart stage, in one process (same machine state): seconds per training step (the
stage's batch, bf16 autocast as the quickstart) and seconds per eval prompt (generation with the
quickstart's sampler settings + alignment + swd). Random-init weights."""
import sys, time, torch
from vermeer_core.plugins import get_registry
from vermeer_core.spec import load_spec
from vermeer_core.model import replay
from vermeer_core.evaluation import evaluate
from vermeer_core.diffusion import diffusion_loss
reg = get_registry()
n = int(sys.argv[1])
spec = load_spec("specs/quickstart.yaml", reg, [f"eval={{prompts: {n}}}"])
sched = reg.build(spec.diffusion.schedule, "noise_schedule"); sampler = reg.build(spec.sampling.sampler, "sampler")

for k, st in enumerate(spec.stages):
    model = replay(spec, reg, k)
    stream = iter(reg.build(spec.data, "dataset", resolution=st.resolution, batch_size=st.batch_size, rank=0, world_size=1, seed=0))
    batch = next(stream)
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = diffusion_loss(model, batch.images, batch.captions, schedule=sched, resolution=st.resolution,
                                  prediction="v", cond_drop=0.1, generator=None)
        loss.backward()
    step()
    t = time.perf_counter(); [step() for _ in range(3)]; t_step = (time.perf_counter() - t) / 3
    res = evaluate(model, spec=spec, registry=reg, metrics=spec.eval.metrics, n=n, seed=spec.eval.seed,
                   resolution=st.resolution, schedule=sched, sampler=sampler, device=torch.device("cpu"),
                   batch_size=spec.eval.batch_size)
    t_eval = sum(res.seconds.values())
    steps = sum(p.steps for p in st.growth.phases)
    print(f"stage {k} {st.resolution}px: train step {t_step:.3f}s x {steps} steps = {t_step*steps:.0f}s; eval {n} prompts {t_eval:.1f}s "
          f"({res.seconds['generate']:.1f} gen + {res.seconds['score']:.1f} score) = {t_eval/t_step:.0f} train steps, {100*t_eval/(t_step*steps):.1f}% of the stage", flush=True)
