"""sampler plugins (ddpm, ddim, dpmpp-2m) against denoisers whose answer is known exactly."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from vermeer_core.diffusion import alpha_sigma
from vermeer_core.interfaces import Sampler
from vermeer_core.plugins import load
from vermeer_plugins import samplers
from vermeer_plugins.schedules import logsnr_cosine

NAMES = ["ddim", "ddpm", "dpmpp-2m"]


@pytest.fixture(scope="module")
def registry():
    return load(extra=[samplers], autoload=False).registry


def build(registry, name: str, **cfg) -> Sampler:
    return registry.build(registry.parse("sampler", {"type": name, **cfg}), "sampler")


def grid(steps: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return logsnr_cosine(torch.linspace(1, 0, steps + 1, dtype=dtype))


def col(a: Tensor, x: Tensor) -> Tensor:
    return a.view(-1, *([1] * (x.ndim - 1)))


def delta_mixture_denoiser(points: Tensor):
    """Exact posterior mean E[x0 | x_t] for data uniform over ``points`` (K, D)."""

    def denoise(x: Tensor, logsnr: Tensor) -> Tensor:
        alpha, sigma = alpha_sigma(logsnr)
        d2 = ((x[:, None, :] - alpha[:, None, None] * points[None]) ** 2).sum(-1)  # (B, K)
        w = torch.softmax(-d2 / (2 * sigma[:, None] ** 2), dim=1)
        return w @ points

    return denoise


def gaussian_denoiser(mu: float, s: float):
    """Exact E[x0 | x_t] for x0 ~ N(mu, s^2 I)."""

    def denoise(x: Tensor, logsnr: Tensor) -> Tensor:
        alpha, sigma = (col(v, x) for v in alpha_sigma(logsnr))
        return mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x - alpha * mu)

    return denoise


def gaussian_flow(x_start: Tensor, lo: Tensor, hi: Tensor, mu: float, s: float) -> Tensor:
    """Closed-form probability-flow ODE for Gaussian data: the marginals N(alpha mu, alpha^2 s^2 +
    sigma^2) are carried by the affine map that keeps the standardised value fixed."""
    (a0, s0), (a1, s1) = alpha_sigma(lo), alpha_sigma(hi)
    z = (x_start - a0 * mu) / torch.sqrt(a0**2 * s**2 + s0**2)
    return a1 * mu + torch.sqrt(a1**2 * s**2 + s1**2) * z


def test_registered_and_protocol(registry) -> None:
    assert registry.names("sampler") == NAMES
    for name in NAMES:
        assert isinstance(build(registry, name), Sampler)
    with pytest.raises(ValidationError, match="eta"):
        registry.parse("sampler", {"type": "ddim", "eta": -0.1})


@pytest.mark.parametrize("name", NAMES)
def test_single_point_denoiser_gives_the_point(registry, name: str) -> None:
    g = torch.Generator().manual_seed(0)
    x_star = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1
    calls = []

    def denoise(x: Tensor, logsnr: Tensor) -> Tensor:
        assert logsnr.shape == (x.shape[0],)
        calls.append(logsnr[0].item())
        return x_star

    out = build(registry, name).sample(denoise, torch.randn(3, 3, 4, 4, generator=g), grid(10), g)
    torch.testing.assert_close(out, x_star, atol=1e-5, rtol=0)
    # steps + 1 calls, along the grid from noisiest to cleanest.
    assert len(calls) == 11 and calls == sorted(calls)


@pytest.mark.parametrize(("name", "steps"), [("ddim", 100), ("dpmpp-2m", 100), ("ddpm", 400)])
def test_delta_mixture_lands_on_points_uniformly(registry, name: str, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    k, n = 4, 800
    points = torch.tensor([[0.8, 0.8], [-0.8, 0.8], [0.8, -0.8], [-0.8, -0.8]])
    noise = torch.randn(n, 2, generator=g)
    out = build(registry, name).sample(delta_mixture_denoiser(points), noise, grid(steps), g)
    dist = torch.cdist(out, points)
    nearest_d, nearest = dist.min(dim=1)
    assert nearest_d.max().item() < 1e-3, "every sample should sit on a data point"
    freq = torch.bincount(nearest, minlength=k).float() / n
    # expected 0.25 each; sd of a frequency is ~0.015 at n = 800, so these bounds are > 4 sd.
    assert ((freq > 0.18) & (freq < 0.32)).all(), freq


def test_delta_mixture_spread_is_not_collapse(registry) -> None:
    """Guards the uniformity test: sampling a single denoise from pure noise (no integration)
    would return the mean of the points, which is no data point."""
    points = torch.tensor([[0.8, 0.8], [-0.8, -0.8]])
    one_shot = delta_mixture_denoiser(points)(torch.randn(16, 2), torch.full((16,), -15.0))
    assert torch.cdist(one_shot, points).min(dim=1).values.min() > 0.5


def test_ode_samplers_converge_to_closed_form_at_their_order(registry) -> None:
    """DDIM is first order (error halves as steps double), DPM-Solver++(2M) second order
    (error quarters); both converge to the exact flow, which validates the reference too."""
    mu, s = 0.3, 0.5
    x_t = torch.randn(256, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def err(name: str, steps: int) -> float:
        lams = grid(steps, torch.float64)
        ref = gaussian_denoiser(mu, s)(gaussian_flow(x_t, lams[0], lams[-1], mu, s), lams[-1].expand(256))
        return (build(registry, name).sample(gaussian_denoiser(mu, s), x_t, lams) - ref).abs().max().item()

    ddim = err("ddim", 500) / err("ddim", 1000)
    dpmpp = err("dpmpp-2m", 500) / err("dpmpp-2m", 1000)
    assert 1.8 < ddim < 2.2, ddim
    assert 3.0 < dpmpp < 4.8, dpmpp  # ~3.5 here, tending to 4 as the end steps shrink
    assert err("dpmpp-2m", 2000) < 1e-4


@pytest.mark.parametrize(("steps", "ratio"), [(5, 1.0), (10, 0.5), (20, 0.1)])
def test_dpmpp_2m_beats_ddim_at_few_steps(registry, steps: int, ratio: float) -> None:
    """Error against the exact flow of Gaussian data: DPM-Solver++(2M) at most DDIM's, and
    by a widening margin as steps grow (second vs first order)."""
    mu, s = 0.3, 0.5
    lams = grid(steps, torch.float64)
    x_t = torch.randn(512, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = gaussian_denoiser(mu, s)(gaussian_flow(x_t, lams[0], lams[-1], mu, s), lams[-1].expand(512))
    err = {
        name: (build(registry, name).sample(gaussian_denoiser(mu, s), x_t, lams) - ref).abs().mean().item()
        for name in ("ddim", "dpmpp-2m")
    }
    assert err["dpmpp-2m"] <= ratio * err["ddim"], err


@pytest.mark.parametrize(("name", "cfg"), [("ddpm", {}), ("ddim", {"eta": 0.5})])
def test_stochastic_samplers_hit_the_gaussian_marginal(registry, name: str, cfg: dict) -> None:
    mu, s = 0.3, 0.5
    g = torch.Generator().manual_seed(4)
    # Ancestral steps drop Var(x0 | x_t), so coarse grids under-disperse (std ratio ~0.94 at
    # 50 steps); at 400 steps that bias is ~1%, below the 3% bound (4 sd of the estimate).
    noise = torch.randn(10000, 1, generator=g)
    out = build(registry, name, **cfg).sample(gaussian_denoiser(mu, s), noise, grid(400), g)
    assert abs(out.mean().item() - mu) < 0.02
    assert abs(out.std().item() / s - 1) < 0.03


def test_ddpm_is_deterministic_given_the_generator(registry) -> None:
    sampler = build(registry, "ddpm")
    denoise = gaussian_denoiser(0.0, 1.0)
    noise = torch.randn(4, 3)

    def run(seed: int) -> Tensor:
        return sampler.sample(denoise, noise, grid(20), torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


@pytest.mark.parametrize("name", NAMES)
def test_grid_must_increase(registry, name: str) -> None:
    with pytest.raises(ValueError, match="increase"):
        build(registry, name).sample(lambda x, l: x, torch.randn(2, 2), grid(4).flip(0))


def test_dpmpp_first_step_is_ddim(registry) -> None:
    """With one step DPM-Solver++(2M) has no history, so it is exactly first-order DDIM."""
    lams = torch.tensor([-3.0, 2.0])
    denoise = gaussian_denoiser(0.1, 0.7)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(
        build(registry, "dpmpp-2m").sample(denoise, x, lams), build(registry, "ddim").sample(denoise, x, lams)
    )


def test_builtin_wiring() -> None:
    from vermeer_core.plugins import BUILTIN_PLUGINS, get_plugins

    assert dict(BUILTIN_PLUGINS).get("samplers") == "vermeer_plugins.samplers"
    assert get_plugins().manager.get_plugin("samplers").__name__ == "vermeer_plugins.samplers"


def test_math_sanity() -> None:
    # lambda = logsnr / 2 is log(alpha / sigma): the parametrisation DPM-Solver++ uses.
    a, s = alpha_sigma(torch.tensor(3.0))
    assert math.isclose(math.log(a.item() / s.item()), 1.5, rel_tol=1e-6)
