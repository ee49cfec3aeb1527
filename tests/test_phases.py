"""Phases say what trains and at what lr: aliases, globs and lists of them resolve to optimizer
param groups in one place; a wrong ``trainable`` is a spec error (exit 2, field path) in
``validate``, ``plan`` and ``run`` before any run directory exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_spec import spec_data, write_spec
from tiny_model_spec import tiny_spec

from vermeer_core.api import ALIASES, ParamMatch, Phase, PhaseConfig, PhaseError
from vermeer_core.cli import main
from vermeer_core.model import build_stage_model, phase_groups
from vermeer_core.optim import build_optimizer
from vermeer_core.plugins import get_registry


@pytest.fixture(scope="module")
def stage1():
    reg = get_registry()
    spec = tiny_spec((64, 128))
    m0 = build_stage_model(spec, reg, 0)
    return build_stage_model(spec, reg, 1, prev=m0)


def names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def test_aliases_globs_and_first_match_wins(stage1) -> None:
    assert set(ALIASES) >= {"all", "new", "all-but-core"}
    blocks = {n for n in names(stage1) if n.startswith("core.blocks.0.")}
    assert blocks
    groups = phase_groups(stage1, Phase("B", 1, trainable=(ParamMatch("core.blocks.[0-0].*", 0.1, "late"), "new")))
    assert [(g.name, g.lr_mult) for g in groups] == [("late", 0.1), ("new", 1.0)]
    assert groups[0].names == blocks
    assert groups[1].names == {n for n in names(stage1) if not n.startswith(("core.", "text.", "cond."))}
    # a module name is a glob for everything under it
    assert phase_groups(stage1, Phase("x", 1, trainable="core.blocks.0"))[0].names == blocks
    # everything-else after a specific entry
    late, rest = phase_groups(stage1, Phase("x", 1, trainable=(ParamMatch("core.blocks.0", 0.1), "all")))
    assert late.names | rest.names == set(names(stage1)) and not late.names & rest.names


def test_param_groups_become_optimizer_groups_at_their_lr(stage1) -> None:
    groups = phase_groups(stage1, Phase("B", 1, trainable=(ParamMatch("core.blocks.0", 0.1, "late"), "all")))
    opt = build_optimizer(stage1, groups, {}, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    by_group = {}
    for g in opt.param_groups:
        by_group.setdefault(g["group"], set()).update(id(p) for p in g["params"])
        assert g["lr"] == pytest.approx(1e-3 * g["lr_mult"])
    params = dict(stage1.named_parameters())
    assert by_group["late"] == {id(params[n]) for n in groups[0].names}
    assert [g["lr"] for g in opt.param_groups if g["group"] == "late"] == pytest.approx([1e-4, 1e-4])  # decay + no-decay


def test_new_is_created_at_this_stage_even_when_warm_started(stage1) -> None:
    stage1.transfers["stem"] = "stem"  # warm-starting does not make a module "old"
    (group,) = phase_groups(stage1, Phase("A", 1, trainable="new"))
    assert any(n.startswith("stem.") for n in group.names)
    stage1.transfers.clear()


@pytest.mark.parametrize(("trainable", "message"), [
    ("bogus", "unknown alias 'bogus'; aliases: all, new, all-but-core"),
    ([], "the list is empty"),
    (["new", "new"], "group names must be unique; repeated: new"),
])
def test_static_trainable_errors(trainable, message) -> None:
    with pytest.raises(ValueError, match=message):
        PhaseConfig(name="A", steps=1, trainable=trainable)


@pytest.mark.parametrize(("value", "message"), [
    ("core.blocks.[6-7].*", "stages.1.growth.phases.0.trainable: phase 'A': 'core.blocks.[6-7].*' matches no "
                            "parameter of the 16x16 model, so it would train nothing"),
    ("[all, new]", "stages.1.growth.phases.0.trainable: phase 'A': 'new' matches only parameters an earlier "
                   "entry took"),
    ("bogus", "stages.1.growth.phases.0.trainable: unknown alias 'bogus'"),
])
@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_wrong_trainable_exits_2_with_the_field_path_before_any_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, message: str, command: str
) -> None:
    spec = write_spec(tmp_path / "s.yaml", spec_data())
    out = tmp_path / "run"
    args = [command, str(spec), "--set", f"stages.1.growth.phases.0.trainable={value}"]
    assert main(args + (["--out", str(out)] if command == "run" else [])) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_phase_that_trains_nothing_at_stage_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # at stage 0 of greedy growth every module is new, but nothing is "core.blocks.5"
    spec = write_spec(tmp_path / "s.yaml", spec_data())
    assert main(["validate", str(spec), "--set", "stages.0.growth.phases.0.trainable=core.blocks.5"]) == 2
    assert "stages.0.growth.phases.0.trainable: phase 'core': 'core.blocks.5' matches no parameter" in (
        capsys.readouterr().err)


def test_existing_specs_stay_valid() -> None:
    assert PhaseConfig(name="A", steps=1, trainable="all-but-core").phase().trainable == "all-but-core"
    with pytest.raises(PhaseError):
        from vermeer_core.phases import check_trainable

        check_trainable("")
