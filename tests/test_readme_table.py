"""``benchmarks/readme_table.py``: the README "Performance" table from a results file."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from readme_table import render  # noqa: E402


def _doc() -> dict:
    peak = {"group": "peak/cpu/matmul-n1024", "name": "fp32", "baseline": False, "n": 1024, "device": "cpu",
            "tflops": 0.005, "tflops_cpu_time": 0.1, "ms": 500.0, "ms_min": 430.0, "cpu_ms": 22.0, "cpu_ms_min": 21.5}
    # 0.002 TFLOP/s wall x 30 = 0.06 TFLOP/s in CPU time = 60% of the 0.1 TFLOP/s CPU-time peak
    step = {"group": "grown/cpu/quickstart-r128", "name": "fp32", "baseline": False, "device": "cpu", "resolution": 128,
            "batch": 2, "images_per_s": 0.2, "tflops": 0.002, "of_peak": 0.4, "ms": 3000.0, "ms_min": 2900.0,
            "cpu_ms": 100.0, "cpu_ms_min": 95.0}
    dit = {"group": "gap/cpu/core-r32/fp32", "name": "dit-w128-d3", "baseline": True, "device": "cpu",
           "ms": 1000.0, "ms_min": 900.0, "cpu_ms": 50.0}
    core = {"group": "gap/cpu/core-r32/fp32", "name": "-fsdp2", "baseline": False, "device": "cpu", "ms": 1000.0,
            "ms_min": 950.0, "cpu_ms": 100.0, "baseline_ratio": 0.9, "flop_share": 1.0}
    return {"started": "s", "finished": "f", "command": ["/x/pytest/__main__.py", "benchmarks/test_baselines.py"],
            "machine": {"device_name": "cpu X", "cpu_count": 2, "torch": "t", "torch_threads": 1, "git_commit": "abc",
                        "loadavg": [1, 2, 3], "loadavg_end": [3, 2, 1]},
            "results": [peak, step, dit, core]}


def test_shares_of_peak_and_dit_ratios_are_taken_in_cpu_time() -> None:
    text = render(_doc())
    assert "Command: `python -m pytest benchmarks/test_baselines.py`" in text
    assert "100.0 GFLOP/s in CPU time" in text
    row = next(line for line in text.splitlines() if line.startswith("| grown stage 128 px"))
    assert "**60% of the fp32 peak**" in row  # 2 GFLOP/s x (3000 / 100) over 100 GFLOP/s
    assert "40%" not in row  # the wall-clock share of a shared machine is not shown
    gap = next(line for line in text.splitlines() if line.startswith("| the gap to the DiT"))
    # equal wall times, but the variant used twice the DiT's CPU time per step: 0.9 x (10 / 20)
    assert "`-fsdp2`" in gap and "wall 0.90, **CPU time 0.45**" in gap


def test_only_measured_rows_appear() -> None:
    doc = _doc()
    doc["results"] = doc["results"][:1]
    text = render(doc)
    assert "matmul peak" in text and "grown stage" not in text and "gap to the DiT" not in text
