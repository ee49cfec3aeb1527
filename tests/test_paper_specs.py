"""specs/paper: the four schedules of the paper's claim in miniature validate (growth
checked on meta models, as ``vermeer validate`` does) and plan equal training FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vermeer_core.plan import plan_rows, total_train_tflop
from vermeer_core.plugins import get_registry
from vermeer_core.preflight import check_growth
from vermeer_core.spec import load_spec

PAPER = Path(__file__).resolve().parents[1] / "specs" / "paper"
NAMES = ("greedy", "greedy_inherit", "greedy_denoiser", "from_scratch")


@pytest.fixture(scope="module")
def specs():
    reg = get_registry()
    out = {}
    for name in NAMES:
        spec = load_spec(PAPER / f"{name}.yaml", reg)
        check_growth(spec, reg, str(PAPER / f"{name}.yaml"))
        out[name] = spec
    return out


def test_the_four_schedules_are_shipped_and_comparable(specs) -> None:
    assert {p.stem for p in PAPER.glob("*.yaml")} == set(NAMES)
    g, gi, gd, fs = (specs[n] for n in NAMES)
    assert [s.resolution for s in g.stages] == [s.resolution for s in gi.stages] == [32, 64]
    assert [s.resolution for s in gd.stages] == [32, 64]
    assert [s.resolution for s in fs.stages] == [64]
    assert [x.stages[1].growth.init for x in (g, gi, gd)] == ["fresh", "inherit", "inherit-denoiser"]
    assert fs.stages[0].growth.type == "from-scratch"
    # same model sizes, data, optimiser and evaluation: only the schedule differs
    for other in (gi, gd, fs):
        assert other.model == g.model and other.data == g.data and other.optim == g.optim
        assert other.eval == g.eval and other.diffusion == g.diffusion
    assert g.data.type == "synthetic" and g.eval is not None
    assert {m.type for m in g.eval.metrics} == {"alignment", "swd", "fd-efficientnet"}


def test_equal_training_flops_as_planned(specs) -> None:
    reg = get_registry()
    totals = {n: total_train_tflop(plan_rows(s, reg)) for n, s in specs.items()}
    lo, hi = min(totals.values()), max(totals.values())
    assert hi / lo < 1.03, totals
    assert lo > 3, totals  # TFLOP: a real amount of training, not a smoke run


def test_growth_jump_arithmetic() -> None:
    import sys

    sys.path.insert(0, str(PAPER.parents[1] / "benchmarks"))
    from paper_claim import growth_jumps

    records = [{"step": s, "stage": 0, "loss": 1.0} for s in range(1, 41)]
    # the grown stage starts at 3.0 and falls by 0.25 per step down to 1.0
    records += [{"step": 40 + i, "stage": 1, "loss": max(1.0, 3.0 - 0.25 * (i - 1))} for i in range(1, 31)]
    (g,) = growth_jumps(records, window=4)
    assert g["loss_before"] == 1.0 and g["loss_after"] == (3.0 + 2.75 + 2.5 + 2.25) / 4
    # the 3-step running mean is first <= 1.1 at stage step 10: (1.25 + 1 + 1) / 3 (step 9: 1.25)
    assert g["steps_to_recover"] == 10 and g["stage_steps"] == 30
