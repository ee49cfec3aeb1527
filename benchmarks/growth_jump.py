"""Loss jump at the growth step, ``greedy`` with ``init: fresh`` vs ``inherit`` vs ``inherit-denoiser`` (issue 8
item 4), through real ``vermeer run`` s of a small two-stage spec (16 px core on an 8x8 grid
grown to 32 px; a few minutes on 2 CPU cores), then the step-0 fidelity of both inits on the
trained stage-0 model (``benchmarks/inherit_fidelity.py``).

    python benchmarks/growth_jump.py --out runs/growth_jump [--seed 0] [--steps 300 60 --batch 16 --window 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_claim import growth_jumps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def spec(init: str, seed: int, steps: tuple[int, int] = (300, 60), batch: int = 16) -> dict:
    return {
        "name": f"growth-jump-{init}",
        "seed": seed,
        "model": {
            "grid": 8, "cond_dim": 64, "widths": {8: 32, 16: 32, 32: 32},
            "core": {"type": "shallow-uvit", "width": 64, "depth": 2, "heads": 4},
            "block": {"type": "resblock", "num_res_blocks": 1, "groups": 8},
            "text_encoder": {"type": "tiny", "dim": 64, "depth": 1, "heads": 4, "max_tokens": 64},
            "attention": {"type": "math"},
        },
        "diffusion": {"schedule": {"type": "shifted-cosine", "base_resolution": 16}, "prediction": "v",
                      "cond_drop": 0.1,
                      # inherit-denoiser needs the core told its own grid's level (stage 0 is unchanged)
                      **({"conditioning": "normalized-logsnr"} if init == "inherit-denoiser" else {})},
        "data": {"type": "synthetic"},
        "optim": {"lr": 1.0e-3, "warmup_steps": 20, "decay": "constant", "grad_clip": 1.0},
        "ema": {"decay": 0.99},
        "train": {"log_every": 1, "checkpoint_every": 100000, "keep_checkpoints": 4},
        "stages": [
            {"resolution": 16, "batch_size": batch,
             "growth": {"type": "greedy", "phases": [{"name": "core", "steps": steps[0], "trainable": "all"}]}},
            {"resolution": 32, "batch_size": batch,
             "growth": {"type": "greedy", "init": init, "phases": [
                 {"name": "A", "steps": steps[1], "trainable": "new"},
                 {"name": "B", "steps": steps[1], "trainable": "all", "lr_mult": 0.5}]}},
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "growth_jump")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, nargs=2, default=[300, 60], metavar=("CORE", "PHASE"),
                   help="stage-0 steps, and steps of each of the grown stage's phases A and B")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--window", type=int, default=20, help="steps averaged each side of the growth step")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for init in ("fresh", "inherit", "inherit-denoiser"):
        path = args.out / f"{init}.yaml"
        path.write_text(yaml.safe_dump(spec(init, args.seed, tuple(args.steps), args.batch), sort_keys=False))
        procs[init] = subprocess.Popen(
            [sys.executable, "-m", "vermeer_core", "run", str(path), "--out", str(args.out / init),
             "--resume", "never", "--device", "cpu"], cwd=ROOT, stdout=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if any(proc.wait() != 0 for proc in procs.values()):
        print("a run failed", file=sys.stderr)
        return 1
    result = {}
    for init in procs:
        lines = (args.out / init / "metrics.jsonl").read_text().splitlines()
        result[init] = growth_jumps([json.loads(x) for x in lines if x.strip()], args.window)
    (args.out / "jumps.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"| init | loss before (last {args.window}) | loss after (first {args.window}) | jump | steps to recover (10%) |")
    print("|---|---|---|---|---|")
    for init, gs in result.items():
        for g in gs:
            rec = g["steps_to_recover"]
            print(f"| {init} | {g['loss_before']:.4f} | {g['loss_after']:.4f} | {g['jump']:.2f}x | "
                  f"{rec if rec is not None else 'not within ' + str(g['stage_steps'])} |")
    from inherit_fidelity import main as fidelity

    return fidelity([str(args.out / "inherit"), "--weights", "model"])


if __name__ == "__main__":
    sys.exit(main())
