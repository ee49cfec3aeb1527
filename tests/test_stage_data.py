"""Data continues across stages: stage k+1's stream starts where stage k's ended (at the new
resolution) instead of replaying the start of the data; resume across the boundary stays
exact (tests/test_resume.py resumes at stage 0's final checkpoint and compares bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_spec import BASE, STAGE0_END, TOTAL_STEPS, reference_run


def _next_index(run: Path, step: int, rank: int = 0) -> int:
    state = json.loads((run / "checkpoints" / f"step-{step:08d}" / f"rank-{rank:05d}.json").read_text())
    return int(state["data"]["next_index"])


def test_each_stage_starts_where_the_previous_stream_ended(tmp_path_factory: pytest.TempPathFactory) -> None:
    run = reference_run(tmp_path_factory)  # checkpoints at the stage ends, 6 and 12
    b0, b1 = (st["batch_size"] for st in BASE["stages"])
    # synthetic: next_index counts the samples the run consumed from one global stream
    assert _next_index(run, STAGE0_END) == STAGE0_END * b0
    # stage 1 read on from there (replaying the start would give (12 - 6) * b1)
    assert _next_index(run, TOTAL_STEPS) == STAGE0_END * b0 + (TOTAL_STEPS - STAGE0_END) * b1
