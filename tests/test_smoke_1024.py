"""The path to 1024: every stage and phase of specs/grow_1024.yaml runs on a CPU (``--smoke``:
same stages and topology, tiny widths, 2 steps a phase) and ends in 1024x1024 samples."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grow_1024_smoke_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "vermeer_core", "run", str(ROOT / "specs" / "grow_1024.yaml"), "--smoke",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({(x["stage"], x["resolution"]) for x in records}) == [(0, 64), (1, 128), (2, 256), (3, 512), (4, 1024)]
    assert [x["phase"] for x in records if x["stage"] == 4] == ["A", "A", "B", "B"]
    assert all(math.isfinite(x["loss"]) for x in records)
    with Image.open(out / "samples" / "stage4-1024px.png") as im:
        assert min(im.size) >= 1024  # one 1024x1024 sample in a grid with a thin border
    lock = (out / "spec.lock.yaml").read_text()
    assert "activation_checkpointing: true" in lock  # the spec's scale knobs stay on in the smoke
