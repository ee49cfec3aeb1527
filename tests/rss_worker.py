"""Per-rank peak resident memory of the engine's growth step and resume on a >= 100M-parameter
model (run under torchrun by tests/test_meta_growth.py; prints one JSON line per rank).

Peaks are Linux's VmHWM, reset by ``echo 5 > /proc/self/clear_refs`` right before each
measured operation; each is reported as the rise over the resident memory at the reset (the
Python/torch baseline is not sharded and is the same at every world size). glibc's dynamic
mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_, set by the caller) so that freed tensors
really leave the process and the numbers do not depend on allocation history.

Sequence: stage 0 built fresh (core initialised block by block), a carry made of its model,
EMA and an AdamW-shaped optimizer state; the growth to stage 1 (the core reused: loaded from
the carry); a checkpoint of stage 1; everything dropped; the resume of stage 1 from it.
"""

from __future__ import annotations

import copy
import gc
import json
import sys

import torch

from vermeer_core.distributed import end_process, init_distributed, shutdown
from vermeer_core.engine import Engine
from vermeer_core.plugins import get_plugins
from vermeer_core.spec import parse_spec
from vermeer_core.testing import TINY_SPEC


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _rise(base: int) -> int:
    return _status("VmHWM") - base


class _Data:
    def state_dict(self) -> dict[str, int]:
        return {"next_index": 0}


def spec_data(width: int, depth: int) -> dict:
    data = copy.deepcopy(TINY_SPEC)
    data["model"]["core"].update(width=width, depth=depth, heads=8)
    data["model"]["cond_dim"] = 256
    data["model"]["text_encoder"].update(dim=64)
    return data


def main(out: str, width: int, depth: int) -> None:
    d = init_distributed(device="cpu")
    plugins = get_plugins()
    spec = parse_spec(spec_data(width, depth), plugins.registry)
    engine = Engine(spec, plugins, out, d)
    res: dict[str, int | float] = {"rank": d.rank, "world_size": d.world_size}

    base = _reset()
    model, ema = engine._stage_model(0, None)
    res["build_stage0"] = _rise(base)
    res["params"] = sum(p.numel() for p in model.parameters())
    optim = {n: {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p.detach()),
                 "exp_avg_sq": torch.zeros_like(p.detach())} for n, p in model.named_parameters()}
    carry = engine._carry(model, ema, optim)
    del model, ema, optim

    base = _reset()
    model, ema = engine._stage_model(1, carry)
    res["growth"] = _rise(base)
    optim = carry.optim
    del carry

    slot = [s for s in engine.slots if s.stage == 1][-1]
    engine._save(slot.end, slot, model, ema, optim, _Data())
    url = engine.ckpt.latest()
    names = sorted(optim)
    del model, ema, optim

    base = _reset()
    model, ema = engine._stage_model(1, None, fresh=False)
    engine._load(url, model, ema, names)
    res["resume"] = _rise(base)
    res["baseline_rss"] = base
    print(json.dumps(res), flush=True)
    del model, ema
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    end_process(0)
