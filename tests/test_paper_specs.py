"""specs/paper: the three schedules of the paper's claim in miniature validate (growth
checked on meta models, as ``vermeer validate`` does) and plan equal training FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vermeer_core.plan import plan_rows, total_train_tflop
from vermeer_core.plugins import get_registry
from vermeer_core.preflight import check_growth
from vermeer_core.spec import load_spec

PAPER = Path(__file__).resolve().parents[1] / "specs" / "paper"
NAMES = ("greedy", "greedy_inherit", "from_scratch")


@pytest.fixture(scope="module")
def specs():
    reg = get_registry()
    out = {}
    for name in NAMES:
        spec = load_spec(PAPER / f"{name}.yaml", reg)
        check_growth(spec, reg, str(PAPER / f"{name}.yaml"))
        out[name] = spec
    return out


def test_the_three_schedules_are_shipped_and_comparable(specs) -> None:
    assert {p.stem for p in PAPER.glob("*.yaml")} == set(NAMES)
    g, gi, fs = (specs[n] for n in NAMES)
    assert [s.resolution for s in g.stages] == [s.resolution for s in gi.stages] == [32, 64]
    assert [s.resolution for s in fs.stages] == [64]
    assert g.stages[1].growth.init == "fresh" and gi.stages[1].growth.init == "inherit"
    assert fs.stages[0].growth.type == "from-scratch"
    # same model sizes, data, optimiser and evaluation: only the schedule differs
    for other in (gi, fs):
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
