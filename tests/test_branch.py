"""``vermeer run SPEC --from CKPT``: a new run from another run's checkpoint, through the real
CLI (``vermeer_core.cli.main`` in this process) on the tiny two-stage spec of the resume tests.

* A branch whose spec equals its parent's (but for the name) reproduces the parent's later
  stage bit for bit: it continues exactly as a resume would.
* A branch that changes the later stage starts it from the parent's *trained* core (phase A
  freezes it: the branch's final core equals the parent's stage-end core, bit for bit).
* A spec that differs before the branch point is refused with exit 2, naming the fields, and
  nothing is written.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from engine_spec import STAGE0_END, TOTAL_STEPS, consolidate, read_metrics, reference_run, run_main, spec_data, write_spec


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_run(tmp_path_factory)


def _stage_end(run: Path) -> str:
    return str(run / "checkpoints" / f"step-{STAGE0_END:08d}")


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_a_branch_with_the_parents_spec_reproduces_its_later_stage(reference, tmp_path, capsys):
    data = spec_data(checkpoint_every=6)
    data["name"] = "branch"  # a new run: the name may differ
    spec = write_spec(tmp_path / "branch.yaml", data)
    out = tmp_path / "branch"
    r = run_main(["run", str(spec), "--from", _stage_end(reference), "--out", str(out)], capsys)
    assert r.returncode == 0, r.stderr
    assert f"branching from step {STAGE0_END} (stage 0" in r.stdout + r.stderr
    mine, parents = _losses(out), _losses(reference)
    assert mine == parents  # steps 1..6 copied, 7..12 trained again: the same numbers
    assert min(s for s in _losses(out) if s > STAGE0_END) == STAGE0_END + 1
    last = f"step-{TOTAL_STEPS:08d}"
    a = consolidate(out / "checkpoints" / last, tmp_path)
    b = consolidate(reference / "checkpoints" / last, tmp_path)
    assert a.keys() == b.keys() == {"model", "ema", "optim"}
    for part in ("model", "ema"):
        assert a[part] and a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    v = run_main(["validate", str(spec), "--from", _stage_end(reference)], capsys)
    assert v.returncode == 0 and f"can start from {_stage_end(reference)} (stage 0, phase core, step 6)" in v.stdout
    record = json.loads((out / "branch.json").read_text())
    assert record["from"] == _stage_end(reference) and record["stage"] == 0 and record["step"] == STAGE0_END
    assert "metrics.jsonl" in record["copied"] and "samples/stage0-8px.png" in record["copied"]
    assert (out / "samples" / "stage0-8px.png").read_bytes() == (reference / "samples" / "stage0-8px.png").read_bytes()
    # run again: the branch now resumes its own checkpoints (here: it is done)
    r = run_main(["run", str(spec), "--from", _stage_end(reference), "--out", str(out)], capsys)
    assert r.returncode == 0, r.stderr
    assert "holds checkpoints of its own" in r.stdout + r.stderr
    assert _losses(out) == parents


def test_a_branch_grows_its_own_way_from_the_parents_trained_core(reference, tmp_path, capsys):
    data = spec_data(checkpoint_every=100)
    data["stages"][1]["growth"] = {"type": "greedy", "init": "inherit",
                                   "phases": [{"name": "A", "steps": 3, "trainable": "new"}]}
    spec = write_spec(tmp_path / "inherit.yaml", data)
    out = tmp_path / "inherit"
    r = run_main(["run", str(spec), "--from", _stage_end(reference), "--out", str(out)], capsys)
    assert r.returncode == 0, r.stderr
    steps = sorted(_losses(out))
    assert steps == list(range(1, STAGE0_END + 4))  # 6 copied + 3 of the new phase A
    parent = consolidate(_stage_end(reference), tmp_path)
    mine = consolidate(out / "checkpoints" / f"step-{STAGE0_END + 3:08d}", tmp_path)
    core = [k for k in parent["model"] if k.startswith("core.")]
    assert core
    for k in core:  # frozen in phase A: still the parent's trained tensors
        assert torch.equal(mine["model"][k], parent["model"][k]), k
    assert any(k.startswith("encoders.") for k in mine["model"])  # and the model did grow
    assert not any(k.startswith("encoders.") for k in parent["model"])


@pytest.mark.parametrize(
    ("change", "where", "named"),
    [
        (lambda d: d["model"]["core"].update(width=32), "stage0", "model.core.width (16 -> 32)"),
        (lambda d: d.update(seed=1), "stage0", "seed (0 -> 1)"),
        (lambda d: d["stages"][1]["growth"].update(init="inherit"), "run", "stages.1.growth.init"),
    ],
    ids=["core-width", "seed", "stage-of-the-checkpoint"],
)
def test_a_branch_that_changes_what_came_before_is_refused(reference, tmp_path, capsys, change, where, named):
    data = copy.deepcopy(spec_data(checkpoint_every=6))
    change(data)
    spec = write_spec(tmp_path / "bad.yaml", data)
    out = tmp_path / "bad"
    src = _stage_end(reference) if where == "stage0" else str(reference)  # a run dir: its newest (stage 1)
    r = run_main(["run", str(spec), "--from", src, "--out", str(out)], capsys)
    assert r.returncode == 2, r.stderr
    assert named in r.stderr and "may change only later stages" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    v = run_main(["validate", str(spec), "--from", src], capsys)  # the same check, without running
    assert v.returncode == 2 and named in v.stderr


def test_a_branch_from_nothing_says_so(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", spec_data())
    r = run_main(["run", str(spec), "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "out")], capsys)
    assert r.returncode == 1 and "no such checkpoint or run directory" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep_ends", [False, True])
def test_keep_stage_ends_keeps_the_branch_points(tmp_path, keep_ends):
    from vermeer_core.testing import run_spec

    data = spec_data(checkpoint_every=2, keep_checkpoints=2, keep_stage_ends=keep_ends)
    result = run_spec(data, tmp_path / "run")
    assert result.checkpoints == ([STAGE0_END, 10, TOTAL_STEPS] if keep_ends else [10, TOTAL_STEPS])


def test_plan_from_a_checkpoint_counts_only_what_the_branch_trains(reference, tmp_path, capsys):
    data = spec_data(checkpoint_every=6)
    data["stages"][1]["growth"] = {"type": "greedy", "init": "inherit",
                                   "phases": [{"name": "A", "steps": 3, "trainable": "new"}]}
    spec = write_spec(tmp_path / "inherit.yaml", data)
    full = run_main(["plan", str(spec), "--json"], capsys)
    branch = run_main(["plan", str(spec), "--json", "--from", _stage_end(reference)], capsys)
    assert full.returncode == 0 and branch.returncode == 0, full.stderr + branch.stderr
    whole, rows = json.loads(full.stdout), json.loads(branch.stdout)
    assert [(r["stage"], r["steps"], r["steps_to_train"]) for r in rows] == [(0, 6, 0), (1, 3, 3)]
    assert rows[0]["train_tflop"] == 0 and whole[0]["train_tflop"] > 0
    assert rows[1]["train_tflop"] == whole[1]["train_tflop"] > 0
    text = run_main(["plan", str(spec), "--from", _stage_end(reference)], capsys)
    assert f"starting from {_stage_end(reference)}: its 6 steps are not trained again" in text.stdout
    assert "0 of 6" in text.stdout
    bad = run_main(["plan", str(spec), "--from", str(tmp_path / "missing")], capsys)
    assert bad.returncode == 1 and "no such checkpoint or run directory" in bad.stderr
