"""``greedy`` with ``init: inherit``: at step 0 of a grown stage, in a real ``vermeer run``, the
model computes (nearly) up(prev(down(x))); with ``init: fresh`` it does not. (The runs go
through ``vermeer_core.cli.main`` in this process: nothing here needs a process of its own.)"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_spec import BASE, STAGE0_END, run_main, write_spec

from vermeer_core.cli import main

from vermeer_core.inference import load_checkpoint
from vermeer_core.model import VermeerModel, build_stage_model, conditioning_offset
from vermeer_core.plugins import get_registry
from vermeer_core.spec import parse_spec


def _spec(init: str, lr_mult: float = 1e-9, conditioning: str = "logsnr") -> dict:
    data = copy.deepcopy(BASE)
    data.setdefault("diffusion", {})["conditioning"] = conditioning
    data["train"].update(checkpoint_every=100, keep_checkpoints=5)
    # one step at a negligible learning rate: the stage-end checkpoint holds the step-0 model
    data["stages"][1]["growth"] = {
        "type": "greedy", "init": init,
        "phases": [{"name": "probe", "steps": 1, "trainable": "all", "lr_mult": lr_mult}],
    }
    return data


def _out(model: VermeerModel, x: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, logsnr, model.encode_text(["a large red circle", "two small blue squares"]))


def _errors(prev: VermeerModel, grown: VermeerModel, prev_shift: float = 0.0) -> tuple[float, float]:
    """Relative error of grown(x, lam) against up(prev(down(x), lam + prev_shift)) and against
    its 2x2-block mean (what the architecture can represent: see vermeer_plugins.inherit)."""
    g = torch.Generator().manual_seed(1)
    r = grown.resolution
    x = torch.randn(2, 3, r, r, generator=g) * 0.5 + torch.rand(2, 3, 1, 1, generator=g) - 0.5
    logsnr = torch.tensor([-2.0, 3.0])
    small = _out(prev, F.avg_pool2d(x, 2), logsnr + prev_shift)
    target = F.interpolate(small, scale_factor=2, mode="nearest")
    blocky = F.interpolate(F.avg_pool2d(small, 2), scale_factor=4, mode="nearest")
    got = _out(grown, x, logsnr)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    return rel(got, target), rel(got, blocky)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("inherit")
    out = {}
    for name, init, conditioning in (
        ("fresh", "fresh", "logsnr"),
        ("inherit", "inherit", "logsnr"),
        ("inherit-normalized", "inherit", "normalized-logsnr"),
    ):
        spec = write_spec(base / f"{name}.yaml", _spec(init, conditioning=conditioning))
        out[name] = base / name
        assert main(["run", str(spec), "--out", str(out[name]), "--resume", "never"]) == 0
    return out


def _stage_models(run: Path) -> tuple[VermeerModel, VermeerModel]:
    """The trained stage-0 model and the grown stage-1 model at its step 0, as reloaded."""
    reg = get_registry()
    ckpt = run / "checkpoints"
    _, prev, s0 = load_checkpoint(str(ckpt / f"step-{STAGE0_END:08d}"), reg, weights="model")
    _, grown, s1 = load_checkpoint(str(ckpt / f"step-{STAGE0_END + 1:08d}"), reg, weights="model")
    assert (s0, s1) == (0, 1)
    # prev was trained: its head is no longer the zero it starts at
    assert prev.head.proj.weight.abs().max() > 1e-3
    return prev, grown


def test_inherit_starts_as_the_previous_stage_upsampled(runs: dict[str, Path]) -> None:
    errors = {init: _errors(*_stage_models(runs[init])) for init in ("fresh", "inherit")}
    to_target, to_blocky = errors["inherit"]
    assert to_blocky < 1e-4, errors  # exact up to float error and a 1e-12 step
    assert to_target < 0.9, errors  # the sub-pixel detail of prev is what is lost
    assert errors["fresh"][0] > 0.99, errors  # fresh: zero head, nothing of prev


def test_normalized_conditioning_gives_the_core_the_level_of_its_input(runs: dict[str, Path]) -> None:
    """``diffusion.conditioning: normalized-logsnr`` through a real run: the grown model at
    log-SNR lam is prev on the 2x-pooled input *at lam + 2 log 2*, the level that pooled noise
    has (and what prev learnt for it); told lam itself, as the default conditioning does, it
    is not."""
    prev, grown = _stage_models(runs["inherit-normalized"])
    shift = 2 * math.log(grown.resolution / prev.resolution)
    assert (prev.logsnr_offset, grown.logsnr_offset) == (0.0, pytest.approx(shift))
    at_level = _errors(prev, grown, prev_shift=shift)
    at_lam = _errors(prev, grown, prev_shift=0.0)
    assert at_level[1] < 1e-5, (at_level, at_lam)  # float error (~1e-7)
    # the tiny test model has learnt little noise-level dependence (~2e-3), but it shows
    assert at_lam[1] > 1e-4, (at_level, at_lam)


def test_conditioning_offset_per_stage() -> None:
    data = copy.deepcopy(BASE)
    resolutions = [s["resolution"] for s in data["stages"]]
    for conditioning in ("logsnr", "normalized-logsnr"):
        data.setdefault("diffusion", {})["conditioning"] = conditioning
        spec = parse_spec(data, get_registry())
        got = [conditioning_offset(spec, k) for k in range(len(resolutions))]
        want = [0.0 if conditioning == "logsnr" else 2 * math.log(r / resolutions[0]) for r in resolutions]
        assert got == pytest.approx(want)


def test_inherit_is_declared_and_refuses_what_it_cannot_represent(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    reg = get_registry()
    spec = parse_spec(_spec("inherit"), reg, "<test>")
    m0 = build_stage_model(spec, reg, 0)
    m1 = build_stage_model(spec, reg, 1, prev=m0)
    assert m1.shallow_in is m0.shallow_in and m1.topology()["kind"] == "unet"
    assert set(m1.transfers) >= {"encoders.r8.down.weight", "head.proj.weight"}
    data = _spec("inherit")
    data["model"]["widths"] = {4: 8, 8: 12, 16: 8}
    bad = parse_spec(data, reg, "<test>")
    with pytest.raises(ValueError, match=r"model.widths must be 8 at \[8\]"):
        build_stage_model(bad, reg, 1, prev=build_stage_model(bad, reg, 0))
    path = write_spec(tmp_path / "bad.yaml", data)
    r = run_main(["validate", str(path)], capsys)
    assert r.returncode == 2 and "model.widths must be 8" in (r.stderr + r.stdout), r.stderr
