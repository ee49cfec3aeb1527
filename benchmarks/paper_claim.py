"""The paper's claim in miniature (Vermeer, arXiv 2405.16759, issue 8 item 5): greedy growing,
greedy growing with ``init: inherit`` / ``inherit-denoiser`` and training from scratch at equal
training FLOPs.

Runs every spec of ``specs/paper`` for every seed through ``vermeer run`` (a subprocess each,
timed), then reads each run's ``eval/stage{k}.json`` and ``metrics.jsonl`` and writes

* ``results.json`` / ``results.md``: per run and per schedule (mean ± std over seeds) the final
  stage's alignment, per-proposition accuracy, SWD, Fréchet distance (EfficientNet-Lite0
  features), final loss (mean of the last 20 steps), wall time and planned training FLOPs; and,
  for schedules that grow, the loss jump at each growth step and the steps to recover;
* ``alignment_vs_flops.png``: alignment at the end of every stage against the training
  FLOPs spent so far (``vermeer plan``'s estimate).

Full study (3 seeds x 4 schedules, two runs at a time: ~30 min on 2 CPU cores)::

    python benchmarks/paper_claim.py --seeds 0 1 2 --jobs 2 --out runs/paper

``--quick`` scales every phase's steps by 0.1 (``--step-scale`` to choose) and evaluates 16
prompts with 8 sampling steps: a pipeline check, not a result. An existing finished run (its ``wall_s.txt`` present) is reused, not
rerun; ``--force`` reruns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 20  # steps averaged on each side of a growth step
RECOVER = 0.10  # "recovered": the loss is back within 10% of the previous stage's last WINDOW steps


def _scaled(data: dict[str, Any], scale: float, quick: bool) -> dict[str, Any]:
    for stage in data["stages"]:
        for phase in stage["growth"].get("phases", []):
            phase["steps"] = max(2, round(phase["steps"] * scale))
    if quick and data.get("eval"):
        data["eval"].update(prompts=16, steps=8)
    return data


def _planned(spec_path: Path) -> list[dict[str, Any]]:
    from vermeer_core.plan import plan_rows
    from vermeer_core.plugins import get_registry
    from vermeer_core.spec import load_spec

    reg = get_registry()
    return plan_rows(load_spec(str(spec_path), reg), reg)


def _records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def growth_jumps(records: list[dict[str, Any]], window: int = WINDOW) -> list[dict[str, Any]]:
    """For every stage k > 0: mean loss of the first ``window`` steps of k against the last
    ``window`` steps of k-1, and the steps until the loss (a 3-record running mean) is back
    within ``RECOVER`` of the latter (None: never, within the stage)."""
    train = [r for r in records if "loss" in r and "stage" in r]
    out = []
    for k in sorted({r["stage"] for r in train})[1:]:
        before = [r for r in train if r["stage"] == k - 1]
        after = [r for r in train if r["stage"] == k]
        start = after[0]["step"] - 1
        last = [r["loss"] for r in before if r["step"] > before[-1]["step"] - window]
        first = [r["loss"] for r in after if r["step"] <= start + window]
        ref = sum(last) / len(last)
        recover = None
        for i in range(len(after)):
            window = [r["loss"] for r in after[max(0, i - 2): i + 1]]
            if sum(window) / len(window) <= ref * (1 + RECOVER):
                recover = after[i]["step"] - start
                break
        out.append({"stage": k, "loss_before": ref, "loss_after": sum(first) / len(first),
                    "jump": sum(first) / len(first) / ref, "steps_to_recover": recover,
                    "stage_steps": after[-1]["step"] - start})
    return out


def _run(spec: Path, out: Path, force: bool, env: dict[str, str] | None = None) -> float | None:
    done = out / "wall_s.txt"
    if done.exists() and not force:
        return float(done.read_text())
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "vermeer_core", "run", str(spec), "--out", str(out),
                        "--resume", "never", "--device", "cpu"], cwd=ROOT, env=env)
    if r.returncode != 0:
        print(f"FAILED: {spec} (exit {r.returncode})", file=sys.stderr)
        return None
    wall = time.perf_counter() - t0
    done.write_text(f"{wall:.1f}\n")
    return wall


def collect(name: str, seed: int, run: Path, spec: Path, wall: float | None) -> dict[str, Any]:
    rows = _planned(spec)
    flops_by_stage: dict[int, float] = {}
    for r in rows:
        flops_by_stage[r["stage"]] = flops_by_stage.get(r["stage"], 0.0) + r["train_tflop"]
    cum, curve = 0.0, []
    for k in sorted(flops_by_stage):
        cum += flops_by_stage[k]
        path = run / "eval" / f"stage{k}.json"
        if path.exists():
            m = json.loads(path.read_text())["metrics"]
            curve.append({"stage": k, "train_tflop": cum, "alignment": m.get("alignment")})
    last = max(flops_by_stage)
    final = json.loads((run / "eval" / f"stage{last}.json").read_text())["metrics"]
    records = _records(run)
    losses = [r["loss"] for r in records if "loss" in r][-WINDOW // 2:]  # log_every 2: 20 steps
    return {
        "schedule": name, "seed": seed, "run": str(run), "wall_s": wall, "train_tflop": cum,
        "final_loss": sum(losses) / len(losses), "metrics": final, "curve": curve,
        "growth": growth_jumps(records),
    }


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


COLUMNS = [("alignment", "alignment"), ("alignment/all", "all props"), ("alignment/colour", "colour"),
           ("alignment/shape", "shape"), ("alignment/size", "size"), ("alignment/count", "count"),
           ("alignment/relation", "relation"), ("swd", "SWD"), ("fd-efficientnet", "FD (EffNet-L0)")]


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    m, s = _mean_std(xs)
    return f"{m:.3g} ± {s:.2g}" if len(xs) > 1 else f"{m:.3g}"


def markdown(results: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(r["schedule"] for r in results))
    head = ["schedule", "seeds", "train TFLOP"] + [c[1] for c in COLUMNS] + ["final loss", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        rs = [r for r in results if r["schedule"] == n]
        cells = [n, str(len(rs)), _fmt([r["train_tflop"] for r in rs])]
        for key, _ in COLUMNS:
            cells.append(_fmt([r["metrics"][key] for r in rs if r["metrics"].get(key) is not None]))
        cells += [_fmt([r["final_loss"] for r in rs]), _fmt([r["wall_s"] for r in rs if r["wall_s"]])]
        lines.append("| " + " | ".join(cells) + " |")
    jumps = [(r["schedule"], r["seed"], g) for r in results for g in r["growth"]]
    if jumps:
        lines += ["", f"Growth steps: mean loss of the first {WINDOW} steps of the grown stage over the last "
                  f"{WINDOW} of the previous (jump), and steps until the loss is back within "
                  f"{RECOVER:.0%} of the latter.", "",
                  "| schedule | seed | stage | loss before | loss after | jump | steps to recover |",
                  "|---|---|---|---|---|---|---|"]
        for n, seed, g in jumps:
            rec = g["steps_to_recover"]
            lines.append(f"| {n} | {seed} | {g['stage']} | {g['loss_before']:.4f} | {g['loss_after']:.4f} | "
                         f"{g['jump']:.2f}x | {rec if rec is not None else 'not within ' + str(g['stage_steps'])} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = dict(zip(dict.fromkeys(r["schedule"] for r in results), ("C0", "C1", "C2", "C3", "C4")))
    seen: set[str] = set()
    for r in results:
        xs = [p["train_tflop"] for p in r["curve"]]
        ys = [p["alignment"] for p in r["curve"]]
        label = r["schedule"] if r["schedule"] not in seen else None
        seen.add(r["schedule"])
        ax.plot(xs, ys, "o-", color=colours[r["schedule"]], alpha=0.7, label=label)
    ax.set_xlabel("training compute (TFLOP, vermeer plan)")
    ax.set_ylabel("alignment (held-out prompts)")
    ax.set_title("alignment at each stage end (greedy: 32 px core, then 64 px)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "paper")
    p.add_argument("--specs", type=Path, default=ROOT / "specs" / "paper")
    p.add_argument("--quick", action="store_true", help="0.1x steps, 16 eval prompts, 8 sampling steps: a pipeline check")
    p.add_argument("--step-scale", type=float, help="scale every phase's steps (overrides --quick's 0.1)")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (each then gets OMP_NUM_THREADS=1; 2 on a 2-core machine)")
    args = p.parse_args(argv)
    scale = args.step_scale or (0.1 if args.quick else 1.0)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = []
    for spec_path in sorted(args.specs.glob("*.yaml")):
        for seed in args.seeds:
            data = yaml.safe_load(spec_path.read_text())
            data["seed"] = seed
            if scale != 1.0 or args.quick:
                data = _scaled(data, scale, args.quick)
            name = spec_path.stem
            spec = args.out / "specs" / f"{name}-s{seed}.yaml"
            spec.parent.mkdir(parents=True, exist_ok=True)
            spec.write_text(yaml.safe_dump(data, sort_keys=False))
            todo.append((name, seed, spec, args.out / f"{name}-s{seed}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else None

    def one(job: tuple[str, int, Path, Path]) -> float | None:
        name, seed, spec, run = job
        print(f"== {name} seed {seed} -> {run}", flush=True)
        return _run(spec, run, args.force, env)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads wait on subprocesses
        walls = list(pool.map(one, todo))
    results = [collect(name, seed, run, spec, wall)
               for (name, seed, spec, run), wall in zip(todo, walls) if wall is not None]
    if not results:
        print("no run finished", file=sys.stderr)
        return 1
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (args.out / "results.md").write_text(md)
    plot(results, args.out / "alignment_vs_flops.png")
    print(md)
    return 0 if len(results) == len(args.seeds) * len(list(args.specs.glob("*.yaml"))) else 1


if __name__ == "__main__":
    sys.exit(main())
