"""metrics ``swd`` and ``fd-efficientnet``: identical sets score ~0, two draws of the same
distribution score low, noise scores far; the Fréchet formula matches scipy's sqrtm."""

from __future__ import annotations

import pytest
import torch

from vermeer_core.interfaces import Metric
from vermeer_core.plugins import get_registry
from vermeer_plugins.fd_efficientnet import frechet_distance
from vermeer_plugins.swd import laplacian_pyramid
from vermeer_plugins.synthetic import SyntheticConfig, eval_scene, render

CFG = SyntheticConfig(max_objects=2)


def renders(seed: int, n: int, res: int) -> tuple[list, torch.Tensor]:
    from vermeer_core.interfaces import EvalPrompt
    from vermeer_plugins.synthetic import caption

    scenes = [eval_scene(seed, i, CFG) for i in range(n)]
    images = torch.stack([torch.from_numpy(render(s, res)) for s in scenes])
    return [EvalPrompt(caption(s), s) for s in scenes], images


def build(name: str, **config: object) -> Metric:
    reg = get_registry()
    return reg.build(reg.parse("metric", {"type": name, **config}), "metric", device=torch.device("cpu"))


def distance(metric: Metric, images: torch.Tensor, references: torch.Tensor, prompts: list) -> dict[str, float]:
    metric.reset()
    half = len(images) // 2  # two updates: state accumulates across batches
    metric.update(images[:half], prompts[:half], references[:half])
    metric.update(images[half:], prompts[half:], references[half:])
    return metric.compute()


def test_laplacian_pyramid_levels_sum_back_to_the_image() -> None:
    x = torch.rand(2, 3, 64, 64)
    levels = laplacian_pyramid(x, 16)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    # rebuild coarse to fine with the same upsampling the pyramid subtracted
    from vermeer_plugins.swd import _blur

    img = levels[-1]
    for lap in reversed(levels[:-1]):
        up = torch.zeros_like(lap)
        up[..., ::2, ::2] = img
        img = lap + 4.0 * _blur(up)
    assert torch.allclose(img, x, atol=1e-5)


def test_swd_identical_zero_same_distribution_low_noise_far() -> None:
    prompts, real = renders(1234, 16, 64)
    _, other = renders(99, 16, 64)
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    swd = build("swd", patches_per_image=64, directions=128)
    same = distance(swd, real, real, prompts)
    assert set(same) == {"swd", "swd/64", "swd/32", "swd/16"}
    assert same["swd"] == 0.0
    d_other = distance(swd, other, real, prompts)["swd"]
    d_noise = distance(swd, noise, real, prompts)["swd"]
    # measured: other draw ~101, noise ~498 (x1e-3). Per-level normalisation (as in Karras et
    # al.) makes SWD insensitive to a global loss of contrast, e.g. blur: not tested for.
    assert 0 < d_other and d_noise > 3 * d_other, (d_other, d_noise)
    with pytest.raises(ValueError, match="reference"):
        swd.update(real, prompts, None)


def test_frechet_distance_matches_the_closed_form() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(150, 6, generator=g, dtype=torch.float64) * 2 + 1
    ca, cb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    covmean = scipy_linalg.sqrtm(ca @ cb).real
    expected = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + float(ca.trace() + cb.trace() - 2 * covmean.trace())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_fd_efficientnet_identical_zero_noise_far() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    prompts, real = renders(1234, 16, 32)
    _, other = renders(99, 16, 32)
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd = build("fd-efficientnet", input_size=128)
    same = distance(fd, real, real, prompts)["fd-efficientnet"]  # the metric's own path, once
    f_real, f_other, f_noise = (fd.features(x) for x in (real, other, noise))
    d_other, d_noise = frechet_distance(f_other, f_real), frechet_distance(f_noise, f_real)
    # 16 images < 1280 features: singular covariances, so "identical" is 0 up to eigh
    # round-off, and every distance carries a large small-sample bias (measured: another draw
    # of scenes 217, noise 569; at 224 px input 58 / 237)
    assert abs(same) < 1e-3 * d_other
    assert d_noise > 2 * d_other, (d_other, d_noise)
