"""Metrics: one JSON line per log step, a progress bar on a terminal, FLOP counting, MFU."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

import fsspec
import torch

from vermeer_core.io import atomic_write_text, is_local_fs

__all__ = ["MetricsLog", "peak_flops", "memory_bytes", "trim_metrics"]

# Dense bf16 peak of known accelerators (vendor data sheets), for MFU. Unknown devices (CPUs
# included) report no MFU rather than a guessed one.
_PEAK_BF16 = {
    "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100": 989e12, "H200": 989e12,
    "H100 PCIe": 756e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12,
}


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when unknown or not a bf16 run (fp32 runs
    report no MFU: which peak applies, TF32 or true fp32, depends on backend settings)."""
    if device.type != "cuda" or not bf16:
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(_PEAK_BF16, key=len, reverse=True):
        if key in name:
            return _PEAK_BF16[key]
    return None


def memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA max allocated, else the peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MetricsLog:
    """Writes ``metrics.jsonl`` (rank 0) and shows progress: a tqdm bar on a terminal, one quiet
    line per log step otherwise (CI, files).

    On a local disk records are appended as they come. Object stores (gs://) cannot append and
    publish an object only when it is closed, so there the records are kept in memory (with
    those already in the file) and the whole file is rewritten by :meth:`flush` — which the
    engine calls before every checkpoint — and at close. A kill then loses only records of
    steps after the last checkpoint, which a resume runs (and logs) again.
    """

    def __init__(self, url: str | None, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.url = url
        self._file = None
        self._bar = None
        self._lines: list[str] | None = None  # object stores: every record, rewritten on flush
        if not enabled:
            return
        if url is not None:
            fs, path = fsspec.core.url_to_fs(url)
            if is_local_fs(fs):
                self._file = fs.open(path, "a")
            else:
                self._lines = []
                if fs.exists(path):
                    with fs.open(path, "r") as f:
                        self._lines = [line for line in f.read().splitlines() if line.strip()]
        interactive = sys.stderr.isatty() and not os.environ.get("CI")
        if interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        elif self._lines is not None:
            self._lines.append(json.dumps(record))
        if self._bar is not None:
            self._bar.set_postfix(stage=record.get("stage"), phase=record.get("phase"), loss=f"{record.get('loss', float('nan')):.4f}")
        else:
            keys = ("step", "stage", "phase", "loss", "lr", "grad_norm", "images_per_s")
            print(" ".join(f"{k}={_fmt(record[k])}" for k in keys if k in record), file=sys.stderr, flush=True)

    def flush(self) -> None:
        """Make every record so far durable (object stores: rewrite the file)."""
        if self._lines is not None and self.url is not None:
            atomic_write_text(self.url, "".join(line + "\n" for line in self._lines))

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        self.flush()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trim_metrics(url: str, start: int) -> None:
    """Drop the records of steps after ``start`` (a killed run logged steps that are now run
    again) and a line torn by the kill, so the file keeps one record per logged step."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return
    with fs.open(path, "r") as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= start:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # torn or foreign line
    if len(keep) != len(lines):
        atomic_write_text(url, "".join(line + "\n" for line in keep))
