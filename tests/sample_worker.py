"""Sharded sampling and evaluation generation (run under torchrun by tests/test_sharded_sampling.py):
builds the tiny spec's stage-0 model through the engine (initialised the same at any world
size), samples 5 prompts with the stochastic DDPM sampler and generates 5 held-out eval
prompts in chunks of 2, each rank its share; rank 0 saves both image tensors to ``OUT``."""

from __future__ import annotations

import copy
import os
import sys

import torch

from vermeer_core.distributed import end_process, init_distributed, shutdown
from vermeer_core.engine import Engine
from vermeer_core.evaluation import eval_source, generate_eval
from vermeer_core.plugins import get_plugins
from vermeer_core.sampling import generate
from vermeer_core.spec import parse_spec
from vermeer_core.testing import TINY_SPEC

PROMPTS = ["a large red circle", "a small blue square", "two green triangles", "a yellow circle", "a red square"]


def main(out: str) -> None:
    d = init_distributed(device="cpu")
    data = copy.deepcopy(TINY_SPEC)
    data["sampling"] = {**data["sampling"], "sampler": {"type": "ddpm"}, "steps": 4}
    plugins = get_plugins()
    spec = parse_spec(data, plugins.registry)
    engine = Engine(spec, plugins, out, d)
    model, _ = engine._stage_model(0, None)
    res = spec.stages[0].resolution
    with torch.no_grad():  # FSDP2 initialises lazily on the root's first forward (training does this in a run)
        model(torch.zeros(1, 3, res, res), torch.zeros(1), ["a"])
    kw = dict(spec=spec, schedule=engine.schedule, sampler=engine.sampler, resolution=res, device=d.device,
              rank=d.rank, world_size=d.world_size)
    images = generate(model, PROMPTS, **kw)
    prompts = eval_source(spec, plugins.registry, res).eval_prompts(5, 3)
    evals = generate_eval(model, prompts, seed=11, batch_size=2, **kw)
    if d.rank == 0:
        os.makedirs(out, exist_ok=True)
        torch.save({"samples": images, "eval": evals}, f"{out}/images.pt")
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
    end_process(0)
