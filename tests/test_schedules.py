"""noise_schedule plugins: cosine, shifted-cosine, interpolated-cosine; alpha_sigma."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from vermeer_core.diffusion import alpha_sigma
from vermeer_core.interfaces import NoiseSchedule
from vermeer_core.plugins import load
from vermeer_plugins import schedules

NAMES = ["cosine", "shifted-cosine", "interpolated-cosine"]


@pytest.fixture(scope="module")
def registry():
    return load(extra=[schedules], autoload=False).registry


def build(registry, name: str, **cfg):
    return registry.build(registry.parse("noise_schedule", {"type": name, **cfg}), "noise_schedule")


def test_registered(registry) -> None:
    assert registry.names("noise_schedule") == sorted(NAMES)
    for name in NAMES:
        assert isinstance(build(registry, name), NoiseSchedule)


def test_builtin_wiring() -> None:
    from vermeer_core.plugins import BUILTIN_PLUGINS, get_plugins

    assert dict(BUILTIN_PLUGINS).get("schedules") == "vermeer_plugins.schedules"
    assert get_plugins().manager.get_plugin("schedules").__name__ == "vermeer_plugins.schedules"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("resolution", [32, 64, 512])
def test_monotone_finite_and_variance_preserving(registry, name: str, resolution: int) -> None:
    t = torch.linspace(0, 1, 2001)
    logsnr = build(registry, name).logsnr(t, resolution)
    assert torch.isfinite(logsnr).all()
    assert (logsnr[1:] < logsnr[:-1]).all(), "log-SNR must strictly decrease in t"
    alpha, sigma = alpha_sigma(logsnr)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha), atol=1e-6, rtol=0)


def test_cosine_formula_and_clip(registry) -> None:
    sched = build(registry, "cosine", logsnr_min=-10, logsnr_max=12)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sched.logsnr(t, 64), torch.tensor([12.0, -10.0], dtype=torch.float64))
    # With wide bounds the clip barely moves t, so the interior matches -2 log tan(pi t / 2).
    wide = build(registry, "cosine", logsnr_min=-60, logsnr_max=60)
    t = torch.tensor([0.1, 0.3, 0.5, 0.8], dtype=torch.float64)
    torch.testing.assert_close(wide.logsnr(t, 64), -2 * torch.log(torch.tan(math.pi * t / 2)), atol=1e-10, rtol=0)
    assert wide.logsnr(torch.tensor([0.5]), 64).abs().item() < 1e-6  # midpoint: SNR = 1


def test_cosine_fp32_matches_fp64_near_both_ends(registry) -> None:
    sched = build(registry, "cosine")
    t64 = torch.cat([torch.linspace(0, 1e-3, 50), torch.linspace(1 - 1e-3, 1, 50)]).double()
    ref = sched.logsnr(t64, 64)
    torch.testing.assert_close(sched.logsnr(t64.float(), 64).double(), ref, atol=2e-5, rtol=0)


def test_cosine_ignores_resolution(registry) -> None:
    sched = build(registry, "cosine")
    t = torch.rand(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sched.logsnr(t, 32), sched.logsnr(t, 1024))


@pytest.mark.parametrize("resolution", [16, 128, 1024])
def test_shift_is_exactly_two_log_ratio(registry, resolution: int) -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    cos = build(registry, "cosine").logsnr(t, resolution)
    shifted = build(registry, "shifted-cosine", base_resolution=64).logsnr(t, resolution)
    shift = torch.full_like(t, 2 * math.log(64 / resolution))
    torch.testing.assert_close(shifted - cos, shift, atol=1e-12, rtol=0)


def test_shifted_equals_cosine_at_base_resolution(registry) -> None:
    t = torch.linspace(0, 1, 101)
    shifted = build(registry, "shifted-cosine", base_resolution=128)
    assert torch.equal(shifted.logsnr(t, 128), build(registry, "cosine").logsnr(t, 128))


def test_interpolated_formula_endpoints_and_midpoint(registry) -> None:
    res = 512
    interp = build(registry, "interpolated-cosine", base_resolution_low=32, base_resolution_high=256)
    low = build(registry, "shifted-cosine", base_resolution=32)
    high = build(registry, "shifted-cosine", base_resolution=256)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    got, lo, hi = interp.logsnr(t, res), low.logsnr(t, res), high.logsnr(t, res)
    torch.testing.assert_close(got[0], hi[0])  # t = 0: the high base resolution's shift
    torch.testing.assert_close(got[2], lo[2])  # t = 1: the low base resolution's shift
    torch.testing.assert_close(got[1], (lo[1] + hi[1]) / 2)
    tt = torch.rand(200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(interp.logsnr(tt, res), tt * low.logsnr(tt, res) + (1 - tt) * high.logsnr(tt, res))


def test_alpha_sigma_values() -> None:
    alpha, sigma = alpha_sigma(torch.tensor([0.0, 40.0, -40.0]))
    torch.testing.assert_close(alpha, torch.tensor([math.sqrt(0.5), 1.0, 0.0]), atol=1e-8, rtol=0)
    torch.testing.assert_close(sigma, torch.tensor([math.sqrt(0.5), 0.0, 1.0]), atol=1e-8, rtol=0)
    logsnr = torch.linspace(-15, 15, 31)
    a, s = alpha_sigma(logsnr)
    torch.testing.assert_close(torch.log(a**2 / s**2), logsnr, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("name", "cfg", "field"),
    [
        ("cosine", {"logsnr_min": 5, "logsnr_max": 1}, "logsnr_min"),
        ("shifted-cosine", {"base_resolution": 0}, "base_resolution"),
        ("interpolated-cosine", {"base_resolution_low": 512, "base_resolution_high": 64}, "swap"),
        ("cosine", {"shift": 1.0}, "shift"),
    ],
)
def test_config_errors(registry, name: str, cfg: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        registry.parse("noise_schedule", {"type": name, **cfg})


def test_bad_resolution_is_a_clear_error(registry) -> None:
    with pytest.raises(ValueError, match="resolution"):
        build(registry, "shifted-cosine").logsnr(torch.tensor([0.5]), 0)
