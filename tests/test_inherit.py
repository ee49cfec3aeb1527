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
from vermeer_core.diffusion import alpha_sigma, sample

from vermeer_core.inference import load_checkpoint
from vermeer_core.model import VermeerModel, build_stage_model, conditioning_offset
from vermeer_core.plugins import get_registry
from vermeer_core.spec import parse_spec
from vermeer_plugins.inherit import DenoiserSkip, LowResHead, PoolConv


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
        ("inherit-denoiser", "inherit-denoiser", "normalized-logsnr"),
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


def _x0(model: VermeerModel, x: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """The model's estimate of the clean image (v-prediction)."""
    alpha, sigma = (t[:, None, None, None] for t in alpha_sigma(logsnr))
    return alpha * x - sigma * _out(model, x, logsnr)


def test_inherit_denoiser_starts_as_the_previous_stage_denoiser(runs: dict[str, Path]) -> None:
    """``init: inherit-denoiser`` through a real run: at step 0 the grown model's clean-image
    estimate is prev's, on the pooled image at its own level (the input scaled to variance
    preserving, conditioned on lam + 2 log 2), averaged over each token's pixels and
    up-sampled, plus the Wiener estimate of the within-token detail; computed here from prev
    directly, independently of DenoiserSkip's closed form."""
    prev, grown = _stage_models(runs["inherit-denoiser"])
    assert isinstance(grown.precondition, DenoiserSkip) and prev.precondition is None
    g = torch.Generator().manual_seed(2)
    r, block, s = grown.resolution, grown.resolution // grown.grid, grown.precondition.detail_std
    x = torch.randn(2, 3, r, r, generator=g) * 0.5 + torch.rand(2, 3, 1, 1, generator=g) - 0.5
    up = lambda t, f: F.interpolate(t, scale_factor=f, mode="nearest")  # noqa: E731
    for lam in (-6.0, -1.0, 3.0, 9.0):
        logsnr = torch.full((2,), lam)
        a, sg = math.sqrt(torch.sigmoid(torch.tensor(lam))), math.sqrt(torch.sigmoid(torch.tensor(-lam)))
        k = math.sqrt(a * a + sg * sg / 4)
        small = F.avg_pool2d(x, 2) / k  # prev's variance-preserving input at lam + 2 log 2
        prev_x0 = _x0(prev, small, logsnr + 2 * math.log(2))
        low = up(F.avg_pool2d(prev_x0, block // 2), block)  # token means, up-sampled
        detail = x - up(F.avg_pool2d(x, block), block)
        want = low + a * s * s / (a * a * s * s + sg * sg) * detail
        got = _x0(grown, x, logsnr)
        assert float((got - want).norm() / want.norm()) < 1e-5, lam


def test_denoiser_skip_closed_form_is_the_v_of_its_estimate() -> None:
    """DenoiserSkip's bounded coefficients equal the direct formula (alpha x - x0_hat) / sigma,
    in float64, across the log-SNR range the schedules use; and they stay finite in bf16."""
    skip = DenoiserSkip(0.05, block=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    out = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    for lam in (-20.0, -5.0, 0.0, 5.0, 15.0):
        logsnr = torch.full((3,), lam, dtype=torch.float64)
        a2, s2 = torch.sigmoid(torch.tensor(lam, dtype=torch.float64)), torch.sigmoid(torch.tensor(-lam, dtype=torch.float64))
        a, sg, k = a2.sqrt(), s2.sqrt(), (a2 + s2 / 4).sqrt()
        a2p = torch.sigmoid(torch.tensor(lam + 2 * math.log(2), dtype=torch.float64))
        low = F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="nearest")
        x0_hat = a2p.sqrt() * low / k - (1 - a2p).sqrt() * out + a * 0.0025 / (a2 * 0.0025 + s2) * (x - low)
        want = (a * x - x0_hat) / sg
        got = skip.combine(x, logsnr, out).double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), lam
        assert torch.allclose(skip.scale_input(x, logsnr), x / k)
        assert torch.isfinite(skip.combine(x.bfloat16(), logsnr.float(), out.bfloat16())).all()


def test_inherit_denoiser_samples_carry_no_within_token_noise(runs: dict[str, Path]) -> None:
    """The failure it fixes: sampling the step-0 ``inherit`` model leaves the within-2x2 part of
    the initial noise in the image (its v has none, so each deterministic step keeps it);
    the step-0 ``inherit-denoiser`` model's samples are as smooth within a token as prev's."""
    reg = get_registry()
    spec = parse_spec(_spec("inherit", conditioning="normalized-logsnr"), reg)
    schedule = reg.build(spec.diffusion.schedule, "noise_schedule")
    ddim = reg.build(reg.parse("sampler", {"type": "ddim"}), "sampler")  # deterministic, first order
    detail = {}
    for name in ("inherit-normalized", "inherit-denoiser"):
        _, grown = _stage_models(runs[name])
        x = sample(grown, ["a large red circle"] * 2, schedule=schedule, sampler=ddim, resolution=grown.resolution,
                   steps=16, guidance=1.0, prediction="v", generator=torch.Generator().manual_seed(3), device="cpu")
        block = grown.resolution // grown.grid
        detail[name] = float((x - F.interpolate(F.avg_pool2d(x, block), scale_factor=block)).std())
    assert detail["inherit-normalized"] > 0.3, detail  # most of the initial noise survives
    assert detail["inherit-denoiser"] < 0.1, detail


def test_inherit_denoiser_needs_normalized_conditioning_and_v(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for key, value, needle in (("conditioning", "logsnr", "normalized-logsnr"), ("prediction", "eps", "prediction: v")):
        data = _spec("inherit-denoiser", conditioning="normalized-logsnr")
        data["diffusion"][key] = value
        r = run_main(["validate", str(write_spec(tmp_path / f"{key}.yaml", data))], capsys)
        assert r.returncode == 2 and needle in r.stderr and "stages.1.growth" in r.stderr, r.stderr
    # the new option leaves existing specs' dump (and so their hash) unchanged
    spec = parse_spec(_spec("inherit"), get_registry())
    assert "detail_std" not in spec.model_dump()["stages"][1]["growth"]


def _three_stage(init2: str) -> dict:
    """The tiny spec grown twice: 8 -> 16 (inherit-denoiser, 3 real steps, so stage 1's own
    network, head and stem are trained) -> 32 (``init2``, one step at a negligible lr)."""
    data = _spec("inherit-denoiser", lr_mult=1.0, conditioning="normalized-logsnr")
    data["stages"][1]["growth"]["phases"] = [{"name": "AB", "steps": 3, "trainable": "all"}]
    data["model"]["widths"][32] = data["model"]["widths"][16]
    data["stages"].append({"resolution": 32, "batch_size": 4, "growth": {
        "type": "greedy", "init": init2,
        "phases": [{"name": "probe", "steps": 1, "trainable": "all", "lr_mult": 1e-9}]}})
    return data


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("inherit_unet")
    spec = write_spec(base / "grow2.yaml", _three_stage("inherit-denoiser"))
    assert main(["run", str(spec), "--out", str(base / "run"), "--resume", "never"]) == 0
    return base / "run"


def test_inherit_denoiser_from_a_unet_starts_as_its_denoiser(unet_run: Path) -> None:
    """U-Net to U-Net through a real run: at step 0 of stage 2 the grown model's clean-image
    estimate is stage 1's (itself a DenoiserSkip model) on the pooled image at its own level,
    up-sampled, plus the Wiener estimate of the within-2x2 detail. Computed from stage 1
    directly; exact, since the new head up-samples prev's head (no sub-pixel approximation)."""
    reg = get_registry()
    ckpt = unet_run / "checkpoints"
    s1_end = STAGE0_END + 3
    _, prev, s1 = load_checkpoint(str(ckpt / f"step-{s1_end:08d}"), reg, weights="model")
    _, grown, s2 = load_checkpoint(str(ckpt / f"step-{s1_end + 1:08d}"), reg, weights="model")
    assert (s1, s2) == (1, 2)
    assert isinstance(prev.precondition, DenoiserSkip) and grown.precondition.inner is not None
    assert isinstance(grown.head, LowResHead) and isinstance(grown.encoders["r32"].down, PoolConv)
    assert prev.head.proj.weight.abs().max() > 1e-3  # prev's head was trained, not the zero init
    g = torch.Generator().manual_seed(4)
    r, s = grown.resolution, grown.precondition.detail_std
    x = torch.randn(2, 3, r, r, generator=g) * 0.5 + torch.rand(2, 3, 1, 1, generator=g) - 0.5
    up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
    for lam in (-6.0, -1.0, 3.0, 9.0):
        logsnr = torch.full((2,), lam)
        a, sg = math.sqrt(torch.sigmoid(torch.tensor(lam))), math.sqrt(torch.sigmoid(torch.tensor(-lam)))
        k = math.sqrt(a * a + sg * sg / 4)
        prev_x0 = _x0(prev, F.avg_pool2d(x, 2) / k, logsnr + 2 * math.log(2))
        detail = x - up(F.avg_pool2d(x, 2))
        want = up(prev_x0) + a * s * s / (a * a * s * s + sg * sg) * detail
        got = _x0(grown, x, logsnr)
        assert float((got - want).norm() / want.norm()) < 1e-5, lam


def test_nested_denoiser_skip_closed_form_is_the_v_of_its_estimate() -> None:
    """A nested DenoiserSkip returns, for a network output up-sampled from a half-resolution
    one, the v of up(prev's estimate) + Wiener detail (float64, log-SNR -20..15); any output
    enters with the factor gain(λ); finite in bf16."""
    inner = DenoiserSkip(0.05, block=4)
    skip = DenoiserSkip(0.05, block=2, inner=inner)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    small_out = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64)
    out = F.interpolate(small_out, scale_factor=2, mode="nearest")
    for lam in (-20.0, -5.0, 0.0, 5.0, 15.0):
        logsnr = torch.full((3,), lam, dtype=torch.float64)
        a2 = torch.sigmoid(torch.tensor(lam, dtype=torch.float64))
        a, sg, k = a2.sqrt(), (1 - a2).sqrt(), (a2 + (1 - a2) / 4).sqrt()
        lam_p = logsnr + 2 * math.log(2)
        a2p = torch.sigmoid(lam_p[0])
        y = F.avg_pool2d(x, 2) / k
        prev_x0 = a2p.sqrt() * y - (1 - a2p).sqrt() * inner.combine(y, lam_p, small_out).double()
        low = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
        x0_hat = F.interpolate(prev_x0, scale_factor=2, mode="nearest") + a * 0.0025 / (a2 * 0.0025 + (1 - a2)) * (x - low)
        want = (a * x - x0_hat) / sg
        got = skip.combine(x, logsnr, out).double()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), lam
        # the network's input pools to prev's network input
        assert torch.allclose(F.avg_pool2d(skip.scale_input(x, logsnr), 2), inner.scale_input(y, lam_p), atol=1e-5)
        assert torch.isfinite(skip.combine(x.bfloat16(), logsnr.float(), out.bfloat16())).all()


def test_inherit_from_a_unet_refuses_what_it_cannot_represent(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cases = (
        # a plain v map cannot start from a DenoiserSkip model's output
        (lambda d: d["stages"][2]["growth"].update(init="inherit"), "grow from it with init: inherit-denoiser"),
        (lambda d: d["model"]["widths"].update({32: 12}), "model.widths must be 8 at [32]"),
    )
    for i, (change, needle) in enumerate(cases):
        data = _three_stage("inherit-denoiser")
        change(data)
        r = run_main(["validate", str(write_spec(tmp_path / f"bad{i}.yaml", data))], capsys)
        assert r.returncode == 2 and needle in r.stderr and "stages.2.growth" in r.stderr, r.stderr


def test_inherit_from_a_fresh_unet_is_exact(tmp_path: Path) -> None:
    """``init: inherit`` (the v map) from a U-Net grown ``fresh`` (no preconditioning): at step 0
    the grown model is up(prev(down(x))) itself, not only its 2x2-block mean (the new head
    up-samples prev's head, so nothing sub-pixel is lost), through a real run."""
    data = _three_stage("inherit")
    data["diffusion"]["conditioning"] = "logsnr"
    data["stages"][1]["growth"]["init"] = "fresh"
    spec = write_spec(tmp_path / "fresh_then_inherit.yaml", data)
    assert main(["run", str(spec), "--out", str(tmp_path / "run"), "--resume", "never"]) == 0
    reg = get_registry()
    s1_end = STAGE0_END + 3
    _, prev, _ = load_checkpoint(str(tmp_path / "run" / "checkpoints" / f"step-{s1_end:08d}"), reg, weights="model")
    _, grown, _ = load_checkpoint(str(tmp_path / "run" / "checkpoints" / f"step-{s1_end + 1:08d}"), reg, weights="model")
    assert prev.precondition is None and grown.precondition is None
    to_target, _ = _errors(prev, grown)
    assert to_target < 1e-5, to_target
