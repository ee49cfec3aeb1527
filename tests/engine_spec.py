"""A tiny two-stage run spec for engine tests, and helpers to run ``vermeer`` in a subprocess.

The spec (:data:`vermeer_core.testing.TINY_SPEC`, shared with plugin authors) grows a grid-4
core from 8x8 to 16x16 in 12 steps (stage 0: 6 steps; stage 1: phase A 2 steps with the core
frozen, phase B 4 steps), so a whole run takes a few seconds on a CPU.
Global step numbers (1-based, as metrics and checkpoints count them)::

    stage 0 "core": steps 1..6 | stage 1 "A": steps 7..8 | stage 1 "B": steps 9..12
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from vermeer_core.testing import TINY_SPEC, committed_steps, consolidate, read_metrics, tiny_spec_data

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
    "run_main",
    "spec_data",
    "write_spec",
]

ROOT = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = TINY_SPEC
TOTAL_STEPS = 12
STAGE0_END = 6
#: (stage, phase name) of every global step
PHASE_OF_STEP: dict[int, tuple[int, str]] = {
    **{s: (0, "core") for s in range(1, 7)}, 7: (1, "A"), 8: (1, "A"), **{s: (1, "B") for s in range(9, 13)},
}


def spec_data(**train: Any) -> dict[str, Any]:
    """A deep copy of :data:`BASE` with ``train`` fields replaced."""
    return tiny_spec_data(None, **train)


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


def run_main(args: list[str], capsys: Any) -> subprocess.CompletedProcess[str]:
    """``vermeer ARGS`` in this process (``vermeer_core.cli.main``, pytest's ``capsys`` capturing
    its output), for commands that need no process of their own (nothing is killed, no torchrun):
    the same code without a fresh interpreter, torch import and plugin load per call. An
    exception main() does not turn into a message propagates and fails the test, as a traceback
    in a subprocess's stderr would."""
    from vermeer_core.cli import main

    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's usage errors, as the console script exits
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["vermeer", *args], rc, out, err)


_REFERENCE: dict[str, Path] = {}


def reference_run(tmp_path_factory: Any) -> Path:
    """An uninterrupted ``vermeer run`` of :data:`BASE` with ``train.checkpoint_every=6`` (once per
    test session; treat it as read-only: copy it before resuming or changing it)."""
    if "run" not in _REFERENCE:
        base = tmp_path_factory.mktemp("reference")
        # checkpoints only at stage ends (6, 12): cheaper, and the resume tests, which save
        # every 2 steps, then also show that checkpointing does not perturb training
        spec = write_spec(base / "reference.yaml", spec_data(checkpoint_every=6))
        out = base / "reference-run"
        # in this process (the CLI's main): the killed-and-resumed real processes compared with
        # it match it bit for bit all the same
        from vermeer_core.cli import main

        assert main(["run", str(spec), "--out", str(out), "--resume", "never"]) == 0
        _REFERENCE["run"] = out
    return _REFERENCE["run"]


