"""Timing and machine description shared by vermeer's benchmarks.

Timings are interleaved: the variants being compared run in turn (round robin, starting with a
different one each round), so drift of a shared machine (other processes, clocks, thermals)
lands on all of them alike, and their ratio is more trustworthy than any single number.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Timing", "compare", "machine_info", "synchronize"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and spread over ``repeats`` timed blocks of ``inner`` calls."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    inner: int
    #: this process's CPU time per call (``time.process_time``), median and best block: on a
    #: machine shared with other jobs it leaves out the time spent waiting for a core, which
    #: the wall clock counts (on CUDA it is the host's launch work only)
    cpu_median_ms: float | None = None
    cpu_min_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ms": self.median_ms, "ms_min": self.min_ms, "ms_max": self.max_ms,
                "repeats": self.repeats, "inner": self.inner,
                "cpu_ms": self.cpu_median_ms, "cpu_ms_min": self.cpu_min_ms}


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA is asynchronous: a host clock alone measures launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _block_ms(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Milliseconds per call over one block of ``inner`` calls (wall clock)."""
    return _block(fn, inner, device)[0]


def _block(fn: Callable[[], object], inner: int, device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) milliseconds per call over one block of ``inner`` calls."""
    c0 = time.process_time()
    wall = _wall_ms(fn, inner, device)
    return wall, (time.process_time() - c0) * 1e3 / inner


def _wall_ms(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def compare(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 2,
    repeats: int = 5,
    min_block_ms: float = 20.0,
    max_inner: int = 200,
) -> tuple[dict[str, Timing], dict[str, str]]:
    """Time each callable in ``fns`` interleaved with the others.

    Each callable is warmed up ``warmup`` times (compilation, autotuning, allocator growth stay
    out of the numbers); a callable that raises there is dropped and its error returned instead.
    Calls are grouped into blocks of ``inner`` calls, ``inner`` chosen per callable so a block
    lasts about ``min_block_ms`` (short kernels are otherwise dominated by timer resolution and
    launch gaps). Returns (timings, errors) keyed by name.
    """
    errors: dict[str, str] = {}
    inner: dict[str, int] = {}
    live: list[str] = []
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            synchronize(device)
            one = _block_ms(fn, 1, device)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            continue
        inner[name] = max(1, min(max_inner, math.ceil(min_block_ms / max(one, 1e-3))))
        live.append(name)
    samples: dict[str, list[float]] = {name: [] for name in live}
    cpu: dict[str, list[float]] = {name: [] for name in live}
    for r in range(repeats):
        order = live[r % len(live):] + live[: r % len(live)] if live else []
        for name in order:
            wall, c = _block(fns[name], inner[name], device)
            samples[name].append(wall)
            cpu[name].append(c)
    timings = {
        name: Timing(statistics.median(s), min(s), max(s), len(s), inner[name],
                     statistics.median(cpu[name]), min(cpu[name]))
        for name, s in samples.items()
    }
    return timings, errors


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _xformers_info() -> dict[str, Any] | None:
    """Version and whether its compiled kernels loaded (a wheel built for another torch/CUDA
    imports, but then only offers the kernels it borrows from PyTorch or Triton)."""
    if not torch.cuda.is_available():
        return None  # never imported without CUDA: it only warns there
    try:
        import xformers
    except Exception as exc:  # noqa: BLE001 - report any import failure
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"importable": True, "version": xformers.__version__,
            "cpp_extensions_loaded": bool(getattr(xformers, "_has_cpp_library", False))}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: software versions, processor, threads, accelerator."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda_available": torch.cuda.is_available(),
        "git_commit": _git_commit(),
        # CPU numbers mean little on a busy machine: the 1/5/15-minute load at the start
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({
            "device_name": torch.cuda.get_device_name(0),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "xformers": _xformers_info(),
        })
    else:
        info["device_name"] = info["cpu"]
    return info
