"""A tiny two-stage run spec for engine tests, and helpers to run ``vermeer`` in a subprocess.

The spec grows a grid-4 core from 8x8 to 16x16 in 12 steps (stage 0: 6 steps; stage 1: phase A
2 steps with the core frozen, phase B 4 steps), so a whole run takes a few seconds on a CPU.
Global step numbers (1-based, as metrics and checkpoints count them)::

    stage 0 "core": steps 1..6 | stage 1 "A": steps 7..8 | stage 1 "B": steps 9..12
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "BASE",
    "PHASE_OF_STEP",
    "ROOT",
    "TOTAL_STEPS",
    "STAGE0_END",
    "committed_steps",
    "consolidate",
    "cli_env",
    "read_metrics",
    "reference_run",
    "run_cli",
    "spec_data",
    "write_spec",
]

ROOT = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "name": "tiny-engine",
    "seed": 0,
    "model": {
        "grid": 4,
        "cond_dim": 16,
        "widths": {4: 8, 8: 8, 16: 8},
        "core": {"type": "shallow-uvit", "width": 16, "depth": 1, "heads": 2},
        "block": {"type": "resblock", "num_res_blocks": 1, "groups": 4},
        "text_encoder": {"type": "tiny", "dim": 16, "depth": 1, "heads": 2, "max_tokens": 32},
        "attention": {"type": "math"},
    },
    "data": {"type": "synthetic", "max_objects": 1},
    "sampling": {"sampler": {"type": "ddim"}, "steps": 2, "guidance": 2.0, "prompts": ["a large red circle"]},
    "optim": {"lr": 1.0e-3, "warmup_steps": 1, "decay": "constant", "grad_clip": 1.0},
    "ema": {"decay": 0.9},
    "train": {"log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 3, "max_bad_steps": 3},
    "stages": [
        {"resolution": 8, "batch_size": 4,
         "growth": {"type": "greedy", "phases": [{"name": "core", "steps": 6, "trainable": "all"}]}},
        {"resolution": 16, "batch_size": 4,
         "growth": {"type": "greedy", "phases": [
             {"name": "A", "steps": 2, "trainable": "new"},
             {"name": "B", "steps": 4, "trainable": "all", "lr_mult": 0.5},
         ]}},
    ],
}
TOTAL_STEPS = 12
STAGE0_END = 6
#: (stage, phase name) of every global step
PHASE_OF_STEP: dict[int, tuple[int, str]] = {
    **{s: (0, "core") for s in range(1, 7)}, 7: (1, "A"), 8: (1, "A"), **{s: (1, "B") for s in range(9, 13)},
}


def spec_data(**train: Any) -> dict[str, Any]:
    """A deep copy of :data:`BASE` with ``train`` fields replaced."""
    data = copy.deepcopy(BASE)
    data["train"].update(train)
    return data


def write_spec(path: Path, data: dict[str, Any] | None = None) -> Path:
    path.write_text(yaml.safe_dump(data if data is not None else BASE, sort_keys=False))
    return path


def cli_env(fault: str | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: quiet warnings, no progress bar, ``VERMEER_FAULT``
    set only when asked for."""
    env = {k: v for k, v in os.environ.items() if k != "VERMEER_FAULT"}
    env.update(PYTHONWARNINGS="ignore", CI="1")
    if fault:
        env["VERMEER_FAULT"] = fault
    return env


def run_cli(
    args: list[str], *, fault: str | None = None, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m vermeer_core ARGS`` in a subprocess (a real process that can be SIGKILLed);
    ``env`` adds variables (e.g. PYTHONPATH for a test plugin)."""
    return subprocess.run(
        [sys.executable, "-m", "vermeer_core", *args],
        capture_output=True, text=True, env={**cli_env(fault), **(env or {})}, cwd=ROOT, timeout=timeout,
    )


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def committed_steps(run: Path) -> list[int]:
    """Steps of the checkpoints under ``run`` that carry a commit marker, oldest first."""
    root = run / "checkpoints"
    if not root.exists():
        return []
    return sorted(int(d.name[5:]) for d in root.glob("step-*") if (d / "COMMITTED").exists())


_REFERENCE: dict[str, Path] = {}


def reference_run(tmp_path_factory: Any) -> Path:
    """An uninterrupted CLI run of :data:`BASE` with ``train.checkpoint_every=6`` (once per
    test session; treat it as read-only: copy it before resuming or changing it)."""
    if "run" not in _REFERENCE:
        base = tmp_path_factory.mktemp("reference")
        # checkpoints only at stage ends (6, 12): cheaper, and the resume tests, which save
        # every 2 steps, then also show that checkpointing does not perturb training
        spec = write_spec(base / "reference.yaml", spec_data(checkpoint_every=6))
        out = base / "reference-run"
        r = run_cli(["run", str(spec), "--out", str(out), "--resume", "never"])
        assert r.returncode == 0, r.stderr
        _REFERENCE["run"] = out
    return _REFERENCE["run"]


def consolidate(checkpoint: Path, tmp: Path) -> dict[str, Any]:
    """All tensors of a DCP checkpoint as full (unsharded) tensors, read by torch's own
    converter: an independent view of what was saved, whatever world size wrote it."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "no process group, assuming a single process"
        dcp_to_torch_save(str(checkpoint), str(out))
    return torch.load(out, weights_only=False)
