"""The README "Performance" table from one ``pytest benchmarks`` results file.

``conftest.py`` writes it beside the JSON at the end of every session
(``benchmarks/results/<timestamp>.md``); to redo it from a results file:

    python benchmarks/readme_table.py benchmarks/results/<timestamp>.json

Only rows the run measured appear: a session of one test gives a table of that test. Every
number comes from the file; nothing here is measured or assumed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["render"]


def _flops(tflops: float | None) -> str:
    """FLOP/s in the unit that fits (a CPU does GFLOP/s, a GPU hundreds of TFLOP/s)."""
    if tflops is None:
        return "-"
    return f"{tflops * 1e3:.1f} GFLOP/s" if tflops < 1 else f"{tflops:.1f} TFLOP/s"


def _pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _rows(results: Iterable[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [r for r in results if r["group"].startswith(prefix)]


def _find(rows: list[dict[str, Any]], group_part: str, name_start: str) -> dict[str, Any] | None:
    return next((r for r in rows if group_part in r["group"] and r["name"].startswith(name_start)), None)


def _cpu(r: dict[str, Any]) -> float:
    """Wall time over process CPU time of the median step (> 1: the step waited for a core)."""
    return r["ms"] / r["cpu_ms"] if r.get("ms") and r.get("cpu_ms") else float("nan")


#: the run's matmul peak per dtype in process CPU time (set by render from the peak rows)
_CPU_PEAK: dict[str, float] = {}


def _step(r: dict[str, Any], peak_name: str) -> str:
    """A training step: time per step, achieved FLOP/s and its share of the run's matmul peak.

    On a CPU the share is taken in process CPU time (the step's FLOPs over its CPU time, against
    the peak matmul's FLOPs over its CPU time): on a machine shared with other jobs the wall
    clock of a step and of the peak are slowed by different amounts, their ratio means
    nothing (it exceeds 100% when the peak was timed in a busier minute). On CUDA: wall clock.
    """
    if r.get("error"):
        return f"failed: {r['error']}"
    head = f"{r['ms'] / 1e3:.2f} s/step wall (median, batch {r.get('batch')}, {r['images_per_s']:.3g} img/s)"
    peak = _CPU_PEAK.get(peak_name)
    if r.get("device") == "cpu" and r.get("cpu_ms") and r.get("tflops") is not None and peak:
        achieved = r["tflops"] * _cpu(r)
        return (f"{head}, {r['cpu_ms'] / 1e3:.2f} s/step CPU time: {_flops(achieved)} = "
                f"**{_pct(achieved / peak)} of the {peak_name} peak**")
    return f"{head}: {_flops(r.get('tflops'))} = **{_pct(r.get('of_peak'))} of the {peak_name} peak**"


def _ratio(v: dict[str, Any], d: dict[str, Any] | None) -> str:
    """``baseline_ratio`` of wall-clock medians, and the same in process CPU time."""
    if v.get("baseline_ratio") is None:
        return "-"
    cpu = v["baseline_ratio"] * _cpu(v) / _cpu(d) if d else float("nan")
    return f"wall {v['baseline_ratio']:.2f}" + (f", **CPU time {cpu:.2f}**" if cpu == cpu else "")


def _command(argv: list[str]) -> str:
    """``sys.argv`` as typed: pytest's ``__main__.py`` path back to ``python -m pytest``."""
    if argv and argv[0].endswith("pytest/__main__.py"):
        argv = ["python -m pytest", *argv[1:]]
    return " ".join(argv)


def render(doc: dict[str, Any]) -> str:
    """Markdown: a header naming the machine, the command and the load, then the table."""
    res: list[dict[str, Any]] = doc["results"]
    m = doc["machine"]
    out = [
        f"Measured {doc.get('started')} to {doc.get('finished')} on **{m.get('device_name')}**, "
        f"{m.get('cpu_count')} CPUs, torch {m.get('torch')}, {m.get('torch_threads')} torch thread(s), "
        f"commit {m.get('git_commit')}; load average {m.get('loadavg')} at the start, "
        f"{m.get('loadavg_end')} at the end.",
        "",
        f"Command: `{_command(doc.get('command', []))}`",
        "",
        "| measurement | result |",
        "| --- | --- |",
    ]

    def add(what: str, result: str) -> None:
        out.append(f"| {what} | {result} |")

    peaks = {r["name"]: r for r in _rows(res, "peak/")}
    _CPU_PEAK.clear()
    _CPU_PEAK.update({k: v["tflops_cpu_time"] for k, v in peaks.items() if v.get("tflops_cpu_time")})
    if peaks:
        n = next(iter(peaks.values())).get("n")
        add(f"matmul peak, {n}^3, best block",
            "; ".join(f"{k} {_flops(v.get('tflops'))} wall" + (f", **{_flops(v['tflops_cpu_time'])} in CPU time**"
                                                               if v.get("tflops_cpu_time") else "")
                      for k, v in peaks.items() if not v.get("error")))
    base = _rows(res, "baseline/")
    for prec in ("fp32", "bf16"):
        v, d = _find(base, f"/{prec}", "vermeer-core"), _find(base, f"/{prec}", "dit-")
        if v:
            add(f"core step (quickstart stage 0: Shallow-UViT core, 32 px, engine `TrainStep` on FSDP2), {prec}",
                _step(v, prec))
        if d:
            add(f"DiT baseline `{d['name']}` ({d['gflop_per_image_fwd'] / v['gflop_per_image_fwd']:.2f}x vermeer's "
                f"{v['gflop_per_image_fwd']:.2f} GFLOP/image), {prec}" if v else f"DiT baseline, {prec}", _step(d, prec))
        if v and v.get("baseline_ratio") is not None:
            add(f"`baseline_ratio` (vermeer FLOP/s / DiT FLOP/s), {prec}", _ratio(v, d))
    gap = _rows(res, "gap/")
    if gap:
        dit = next((r for r in gap if r["baseline"]), None)
        cells = []
        for r in gap:
            if r["baseline"]:
                continue
            if r.get("error"):
                cells.append(f"{r['name']}: failed")
                continue
            cpu = f", {r['cpu_ms'] / 1e3:.2f} s CPU" if r.get("cpu_ms") else ""
            cells.append(f"`{r['name']}` {r['ms'] / 1e3:.2f} s wall{cpu}, "
                         f"{r['flop_share']:.2f}x FLOPs: {_ratio(r, dit)}")
        add("the gap to the DiT, fp32, timed in turns: step (median), FLOPs over the full step's, "
            "FLOP/s over the DiT's" + (f" (DiT {dit['ms'] / 1e3:.2f} s wall" + (f", {dit['cpu_ms'] / 1e3:.2f} s CPU)" if dit.get("cpu_ms") else ")")
                                       if dit and dit.get("ms") else ""),
            "; ".join(cells))
    for r in _rows(res, "grown/"):
        add(f"grown stage {r.get('resolution')} px (quickstart grown on, engine `TrainStep`, all parameters), fp32",
            _step(r, "fp32"))
    samp = _rows(res, "sampling/")
    if samp:
        s0 = samp[0]
        add(f"samplers, {s0.get('steps')} steps ({2 * s0.get('steps', 0)} forwards with guidance), batch {s0.get('batch')}, 32 px",
            ", ".join(f"{r['name']} {r['images_per_s']:.3g} img/s" if not r.get("error") else f"{r['name']} failed" for r in samp))
    ws = _rows(res, "fsdp/")
    w1 = next((r for r in ws if r["name"].startswith("ws1/")), None)
    w2 = next((r for r in ws if r["name"].startswith("ws2/reshard+implicit")), None)
    if w1 and w2:
        add("world size 1 vs 2 (torchrun, gloo), quickstart core step, global batch 24",
            f"median step {w1['ms'] / 1e3:.2f} s vs {w2['ms'] / 1e3:.2f} s ({w1['ms'] / w2['ms']:.2f}x); "
            f"best {w1['ms_min'] / 1e3:.2f} s vs {w2['ms_min'] / 1e3:.2f} s")
        mb = [round(b / 1e6, 1) for b in w2.get("param_bytes_per_rank") or []]
        ob = [round(b / 1e6, 1) for b in w2.get("optim_bytes_per_rank") or []]
        add("per-rank memory, world size 1 vs 2",
            f"parameters {round(w1['param_bytes_per_rank'][0] / 1e6, 1)} vs {mb} MB, AdamW state "
            f"{round(w1['optim_bytes_per_rank'][0] / 1e6, 1)} vs {ob} MB; resident peak "
            f"{[round(x) for x in w1.get('rss_peak_mib_per_rank') or []]} vs "
            f"{[round(x) for x in w2.get('rss_peak_mib_per_rank') or []]} MiB")
        settings = [r for r in ws if r["name"].startswith("ws2/")]
        add("FSDP2 settings at world size 2 (median / best step)",
            ", ".join(f"{r['name'][4:]} {r['ms'] / 1e3:.2f} / {r['ms_min'] / 1e3:.2f} s" for r in settings))
    growth = _rows(res, "growth/")
    if growth:
        add("growth transition (replay, grow, shard, load, transfers), share of a stage at the spec's steps",
            ", ".join(f"{r['name'].split('-')[-1][1:]} px {r['transition_s']:.2f} s ({_pct(r.get('share_of_stage'), 2)}, "
                      f"{_pct(r.get('share_of_stage_measured'), 1)} of the 3-steps-per-phase run)" for r in growth))
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python benchmarks/readme_table.py benchmarks/results/<timestamp>.json")
    print(render(json.loads(Path(argv[0]).read_text())), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
