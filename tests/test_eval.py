"""Evaluation in a run (spec ``eval:``) and ``vermeer eval`` on a checkpoint: files, records,
the pass/fail grid, the same numbers both ways, and user errors."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine_spec import BASE, read_metrics, run_main, write_spec
from vermeer_core.cli import main
from vermeer_core.evaluation import EvalError, check_eval, save_marked_grid
from vermeer_core.hookspecs import hookimpl
from vermeer_core.interfaces import EvalPrompt
from vermeer_core.plugins import load
from vermeer_core.spec import parse_spec

EVAL = {"prompts": 6, "seed": 7, "batch_size": 4, "metrics": [{"type": "alignment"}, {"type": "swd"}]}


def eval_spec(**eval_fields: object) -> dict:
    data = copy.deepcopy(BASE)
    data["train"]["checkpoint_every"] = 6
    data["eval"] = {**EVAL, **eval_fields}
    return data


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("eval")
    out = base / "run"
    # in this process (vermeer_core.cli.main): nothing here needs a process of its own
    assert main(["run", str(write_spec(base / "spec.yaml", eval_spec())), "--out", str(out), "--resume", "never"]) == 0
    return out


def test_every_stage_writes_eval_json_grid_and_a_metrics_record(run: Path) -> None:
    records = [r for r in read_metrics(run) if "eval/alignment" in r]
    assert [(r["stage"], r["step"], r["resolution"]) for r in records] == [(0, 6, 8), (1, 12, 16)]
    for k, rec in enumerate(records):
        data = json.loads((run / "eval" / f"stage{k}.json").read_text())
        assert data["metrics"] == {key[5:]: v for key, v in rec.items() if key.startswith("eval/")}
        assert {"alignment", "alignment/all", "alignment/colour", "swd"} <= set(data["metrics"])
        assert 0.0 <= data["metrics"]["alignment"] <= 1.0 and data["metrics"]["swd"] > 0
        assert len(data["per_prompt"]) == 6 and all("alignment" in p for p in data["per_prompt"])
        grid = Image.open(run / "eval" / f"stage{k}.png")
        assert grid.size[0] > 3 * rec["resolution"]
        lines = (run / "eval" / f"stage{k}.txt").read_text().splitlines()
        assert len(lines) == 6 and all(("[pass]" in x) or ("[FAIL]" in x) for x in lines)
    # loss.png gains the alignment panel: twice as wide as a loss-only plot (700 px)
    assert Image.open(run / "loss.png").size[0] == 1200


def test_vermeer_eval_reproduces_the_stage_numbers(run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ev"
    r = run_main(["eval", str(run), "--out", str(out)], capsys)
    assert r.returncode == 0, r.stderr
    assert "alignment:" in r.stdout
    got = json.loads((out / "eval.json").read_text())
    stage = json.loads((run / "eval" / "stage1.json").read_text())
    # same held-out prompts, seeds and EMA weights as the run's own stage-end evaluation
    assert [p["caption"] for p in got["per_prompt"]] == [p["caption"] for p in stage["per_prompt"]]
    assert got["metrics"]["alignment"] == stage["metrics"]["alignment"]
    assert got["metrics"]["swd"] == pytest.approx(stage["metrics"]["swd"], rel=1e-3)
    assert got["stage"] == 1 and got["resolution"] == 16
    assert (out / "grid.png").exists() and (out / "grid.txt").exists()


def test_vermeer_eval_defaults_and_options(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = run_main(["eval", str(run / "checkpoints" / "step-00000006"), "--prompts", "3", "--seed", "1",
                  "--metric", "alignment"], capsys)
    assert r.returncode == 0, r.stderr
    out = run / "eval" / "step-00000006"  # default: <run>/eval/<checkpoint name>
    got = json.loads((out / "eval.json").read_text())
    assert got["prompts"] == 3 and got["seed"] == 1 and got["stage"] == 0
    assert "swd" not in got["metrics"] and "alignment" in got["metrics"]
    bad = run_main(["eval", str(run), "--metric", "nope", "--out", str(out / "x")], capsys)
    assert bad.returncode == 2 and "--metric" in bad.stderr and "alignment" in bad.stderr
    assert not (out / "x").exists()


def test_unknown_metric_in_spec_exits_2_naming_the_field(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path / "bad.yaml", eval_spec(metrics=[{"type": "alignment"}, {"type": "fid-typo"}]))
    r = run_main(["run", str(spec), "--out", str(tmp_path / "out")], capsys)
    assert r.returncode == 2
    assert "eval.metrics.1: unknown type 'fid-typo'" in r.stderr and "'swd'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_grid_marks_pass_green_and_fail_red(tmp_path: Path) -> None:
    images = torch.zeros(3, 3, 8, 8)
    save_marked_grid(images, [True, False, None], str(tmp_path / "g.png"), border=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    # cells of 12 px (8 + 2 borders) after a 2 px margin, 2 px apart; 2 columns
    assert tuple(grid[2, 2]) == (0, 170, 0)
    assert tuple(grid[2, 2 + 12 + 2]) == (220, 0, 0)
    assert tuple(grid[2 + 12 + 2, 2]) == (150, 150, 150)
    assert tuple(grid[6, 6]) == (128, 128, 128)  # the image itself (0 -> mid grey)


class _Captions:
    """A dataset with held-out captions but no structured scenes (like a web dataset)."""

    def __init__(self, with_prompts: bool) -> None:
        if with_prompts:
            self.eval_prompts = lambda n, seed: [EvalPrompt(f"caption {i}") for i in range(n)]
            self.eval_references = lambda prompts, res: torch.zeros(len(prompts), 3, res, res)


class _DatasetsPlugin:
    @hookimpl
    def vermeer_register(self, registry: object) -> None:
        registry.add("dataset", "no-eval", lambda cfg, **kw: _Captions(False))
        registry.add("dataset", "captions-only", lambda cfg, **kw: _Captions(True))


@pytest.mark.parametrize(("data", "message"), [
    ("no-eval", "offers no held-out prompts"),
    ("captions-only", "eval.metrics cannot score this run's data: alignment: prompt 'caption 0' carries no synthetic scene"),
])
def test_eval_that_cannot_run_fails_before_training(data: str, message: str) -> None:
    registry = load(extra=[_DatasetsPlugin()]).registry
    spec = parse_spec({**eval_spec(), "data": {"type": data}}, registry)
    with pytest.raises(EvalError, match=re.escape(message)):
        check_eval(spec, registry, 8)
    ok = parse_spec({**eval_spec(metrics=[{"type": "swd"}]), "data": {"type": "captions-only"}}, registry)
    check_eval(ok, registry, 8)  # swd needs references only, which this dataset has
