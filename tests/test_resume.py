"""Exact resume after ``kill -9``: real processes, killed during training and at every point of
a checkpoint write, continue from the newest committed checkpoint and log bit-for-bit the
losses of an uninterrupted run (CPU, fp32, counter-based RNG).

Together these also show that resuming several times equals resuming once: the kill test
resumes once, the fault chain three times, and both match the same uninterrupted run.

Processes that are killed are real; a resume that runs to the end goes through
``vermeer_core.cli.main`` in this process (``engine_spec.run_main``): the same code, without
another interpreter start and torch import.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_spec import (
    PHASE_OF_STEP,
    ROOT,
    TOTAL_STEPS,
    cli_env,
    committed_steps,
    consolidate,
    read_metrics,
    reference_run,
    run_cli,
    run_main,
    write_spec,
)


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_run(tmp_path_factory)


def assert_losses_match(run: Path, reference: Path) -> None:
    """One record per step (those a killed process logged past its last checkpoint were
    dropped on resume), with the uninterrupted run's losses, bit for bit."""
    ref, records = read_metrics(reference), read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
    mismatched = [(a["step"], a["loss"], b["loss"]) for a, b in zip(records, ref) if a["loss"] != b["loss"]]
    assert not mismatched, mismatched


def assert_same_final_state(run: Path, reference: Path, tmp: Path) -> None:
    """Model, EMA and optimizer state of the final checkpoints are identical, and so are the
    sample grids."""
    name = f"checkpoints/step-{TOTAL_STEPS:08d}"
    a, b = consolidate(run / name, tmp), consolidate(reference / name, tmp)
    assert a.keys() == b.keys() == {"model", "ema", "optim"}
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["optim"].keys() == b["optim"].keys()
    for k, state in a["optim"].items():
        assert all(torch.equal(state[s], b["optim"][k][s]) for s in state), k
    for png in ("stage0-8px.png", "stage1-16px.png"):
        assert (run / "samples" / png).read_bytes() == (reference / "samples" / png).read_bytes(), png


def resumed_from(stderr: str, step: int) -> bool:
    stage, phase = PHASE_OF_STEP[step]
    return f"resuming from step {step} (stage {stage}, phase {phase})" in stderr


def test_kill_during_training_resumes_bit_exactly(reference: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path / "s.yaml")
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vermeer_core", "run", str(spec), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env(), cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and any(r["step"] >= 3 for r in read_metrics(out)):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # mid-training: steps 3..12 and two stages remain
    finally:
        rc = proc.wait()
    assert rc == -signal.SIGKILL, "the run ended before it could be killed"
    committed = committed_steps(out)
    assert committed and committed[-1] < TOTAL_STEPS
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "stage": 0, "lo')  # as if the kill had torn a line in half
    r = run_main(["run", str(spec), "--out", str(out)], capsys)
    assert r.returncode == 0, r.stderr
    assert resumed_from(r.stderr, committed[-1]), r.stderr
    assert_losses_match(out, reference)
    assert_same_final_state(out, reference, tmp_path)
    # a kill during a save may have left an uncommitted dir: it is gone now
    assert all((d / "COMMITTED").exists() for d in (out / "checkpoints").glob("step-*"))


def test_kill_at_every_point_of_a_checkpoint_write(reference: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """One run killed three times, once at each fault point of a save, resumed after each.

    The resumes land mid-stage, exactly at the growth boundary (stage 0's final checkpoint)
    and at the first step after it (``checkpoint_every=1``, an allowed change on resume)."""
    spec = write_spec(tmp_path / "s.yaml")  # checkpoint_every=2, keep_checkpoints=3
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    run = ["run", str(spec), "--out", str(out)]

    # 1. killed before any shard of step 4 is written: only step 2 is committed
    r = run_cli(run, fault="before-shards:4")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert committed_steps(out) == [2]

    # 2. resumes from 2; killed at step 8 after the shards, before the commit marker
    r = run_cli(run, fault="before-marker:8")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert resumed_from(r.stderr, 2), r.stderr
    assert committed_steps(out) == [2, 4, 6]
    assert (ckpts / "step-00000008" / "meta.json").exists()  # complete but uncommitted debris
    assert not (ckpts / "step-00000008" / "COMMITTED").exists()

    # 3. the newest *committed* checkpoint is 6, stage 0's last (the debris at 8 is newer):
    #    resume exactly at the growth boundary; killed at step 7 after the marker was written,
    #    before the `latest` pointer moved
    r = run_cli([*run, "--set", "train.checkpoint_every=1"], fault="after-marker:7")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert resumed_from(r.stderr, 6), r.stderr
    assert committed_steps(out) == [2, 4, 6, 7]
    assert (ckpts / "latest").read_text().strip() == "step-00000006"

    # 4. step 7 is committed although `latest` still names 6: resume just after the growth
    #    boundary and finish
    r = run_main(run, capsys)
    assert r.returncode == 0, r.stderr
    assert resumed_from(r.stderr, 7), r.stderr

    assert_losses_match(out, reference)
    assert_same_final_state(out, reference, tmp_path)
    # pruned to the newest three; the debris at 8 was replaced by a committed save
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000008", "step-00000010", "step-00000012"]
    assert committed_steps(out) == [8, 10, 12]
    assert (ckpts / "latest").read_text().strip() == "step-00000012"
