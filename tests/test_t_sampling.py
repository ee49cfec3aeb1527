"""Training-time t distribution and loss weighting: ``diffusion.t_sampling`` and
``diffusion.loss_weight`` (vermeer_core.diffusion.TSampling / LossWeight, and their spec)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from vermeer_core.diffusion import LossWeight, TSampling, alpha_sigma, diffusion_loss, target
from vermeer_core.interfaces import TextEmbedding
from vermeer_core.plugins import get_registry
from vermeer_core.spec import SpecError, load_spec, spec_hash
from vermeer_plugins.schedules import ShiftedCosineConfig, ShiftedCosineSchedule

QUICKSTART = "specs/quickstart.yaml"
SCHEDULE = ShiftedCosineSchedule(ShiftedCosineConfig())


def embed_lengths(captions: list[str]) -> TextEmbedding:
    """Caption -> its length as the pooled embedding (one token each)."""
    lengths = torch.tensor([[float(len(c))] for c in captions])
    return TextEmbedding(tokens=lengths[:, None], mask=torch.ones(len(captions), 1, dtype=torch.bool), pooled=lengths)


class SpyModel:
    """raw output = len(caption) + 0.5 x + 0.1 logsnr; remembers its last inputs."""

    def __init__(self) -> None:
        self.encoded: list[list[str]] = []
        self.seen: tuple[Tensor, Tensor] | None = None

    def encode_text(self, captions: list[str]) -> TextEmbedding:
        self.encoded.append(list(captions))
        return embed_lengths(list(captions))

    def __call__(self, x: Tensor, logsnr: Tensor, text: TextEmbedding | list[str]) -> Tensor:
        if not isinstance(text, TextEmbedding):
            text = self.encode_text(text)
        self.seen = (x, logsnr)
        return text.pooled.view(-1, 1, 1, 1) + 0.5 * x + 0.1 * logsnr.view(-1, 1, 1, 1)


def _data(batch: int = 8) -> tuple[Tensor, list[str]]:
    g = torch.Generator().manual_seed(2)
    return torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1, [f"caption {i}" for i in range(batch)]


def _loss(model, seed: int, **kw) -> Tensor:
    images, captions = _data()
    return diffusion_loss(model, images, captions, schedule=SCHEDULE, resolution=8, prediction="v", cond_drop=0.1,
                          generator=torch.Generator().manual_seed(seed), **kw)


# --- TSampling -------------------------------------------------------------------------------
def test_uniform_is_the_identity() -> None:
    u = torch.rand(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(TSampling()(u), u)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.6), (-1.0, 2.0)])
def test_logit_normal_has_the_asked_mean_and_std_in_logit_space(mean: float, std: float) -> None:
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(1))
    t = TSampling("logit-normal", mean, std)(u)
    assert t.dtype == u.dtype and ((t > 0) & (t < 1)).all()
    z = torch.logit(t.double())
    assert abs(z.mean().item() - mean) < 0.02 and abs(z.std().item() - std) < 0.02 * std
    # Monotone in u: the same uniform draws, only re-spaced (what keeps the other draws unchanged).
    order = torch.argsort(u)
    assert (t[order].diff() >= 0).all()


def test_logit_normal_stays_finite_at_the_ends_of_u() -> None:
    t = TSampling("logit-normal")(torch.tensor([0.0, 1.0 - 2**-24]))
    assert torch.isfinite(t).all() and 0 < t[0] < 0.01 and 0.99 < t[1] < 1


def test_bad_t_sampling_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="std > 0"):
        TSampling("logit-normal", 0.0, 0.0)
    with pytest.raises(ValueError, match="'uniform' or 'logit-normal'"):
        TSampling("normal")  # type: ignore[arg-type]


def test_loss_sees_logit_normal_t_and_the_same_noise() -> None:
    """The model gets logsnr(t(u)) for the uniform u the generator draws first, and the
    noise and caption drop that the uniform loss would draw with the same generator."""
    spy_u, spy_ln = SpyModel(), SpyModel()
    ln = TSampling("logit-normal", 0.3, 0.8)
    _loss(spy_u, 7)
    _loss(spy_ln, 7, t_sampling=ln)
    u = torch.rand(8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(spy_u.seen[1], SCHEDULE.logsnr(u, 8))
    torch.testing.assert_close(spy_ln.seen[1], SCHEDULE.logsnr(ln(u), 8))
    images, _ = _data()

    def eps(spy: SpyModel) -> Tensor:
        x_t, logsnr = spy.seen
        a, s = (v.view(-1, 1, 1, 1) for v in alpha_sigma(logsnr))
        return (x_t - a * images) / s

    torch.testing.assert_close(eps(spy_u), eps(spy_ln), rtol=1e-3, atol=1e-3)
    assert spy_u.encoded[-1] == spy_ln.encoded[-1]


# --- LossWeight ------------------------------------------------------------------------------
def test_min_snr_weights_are_hang_et_al() -> None:
    logsnr = torch.tensor([-20.0, 0.0, math.log(10.0)])
    w = LossWeight("min-snr", gamma=5.0)
    torch.testing.assert_close(w(logsnr, "v"), torch.tensor([math.exp(-20.0) / (1 + math.exp(-20.0)), 0.5, 5 / 11]))
    torch.testing.assert_close(w(logsnr, "eps"), torch.tensor([1.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="gamma"):
        LossWeight("min-snr", gamma=0.0)


def test_min_snr_loss_is_the_weighted_mean_of_per_example_errors() -> None:
    spy = SpyModel()
    weight = LossWeight("min-snr", gamma=2.0)
    loss = _loss(spy, 3, loss_weight=weight)
    x_t, logsnr = spy.seen
    images, _ = _data()
    alpha, sigma = alpha_sigma(logsnr)
    eps = (x_t - alpha.view(-1, 1, 1, 1) * images) / sigma.view(-1, 1, 1, 1)
    out = spy(x_t, logsnr, embed_lengths(spy.encoded[-1]))
    per = ((out - target(images, eps, alpha, sigma, "v")) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, (per * weight(logsnr, "v")).mean(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(loss, _loss(SpyModel(), 3))  # the weights do change the loss


def test_options_keep_per_example_generators_split_invariant() -> None:
    images, captions = _data(8)
    kw = dict(t_sampling=TSampling("logit-normal"), loss_weight=LossWeight("min-snr"))

    def loss(idx: list[int]) -> Tensor:
        return diffusion_loss(SpyModel(), images[idx], [captions[i] for i in idx], schedule=SCHEDULE,
                              resolution=8, prediction="v", cond_drop=0.3,
                              generator=[torch.Generator().manual_seed(100 + i) for i in idx], **kw)

    torch.testing.assert_close(loss(list(range(8))), (loss([0, 1, 2, 3]) + loss([4, 5, 6, 7])) / 2)


# --- spec ------------------------------------------------------------------------------------
def test_spec_defaults_are_uniform_and_left_out_of_the_dump() -> None:
    reg = get_registry()
    spec = load_spec(QUICKSTART, reg, [])
    assert spec.diffusion.t_sampling.type == "uniform" and spec.diffusion.loss_weight.type == "uniform"
    dumped = spec.model_dump(mode="json")["diffusion"]
    assert "t_sampling" not in dumped and "loss_weight" not in dumped  # old runs keep their hash
    explicit = load_spec(QUICKSTART, reg, ["diffusion.t_sampling={type: uniform}"])
    assert spec_hash(explicit) == spec_hash(spec)
    other = load_spec(QUICKSTART, reg, ["diffusion.t_sampling={type: logit-normal, std: 1.5}",
                                        "diffusion.loss_weight={type: min-snr, gamma: 3}"])
    d = other.model_dump(mode="json")["diffusion"]
    assert d["t_sampling"] == {"type": "logit-normal", "mean": 0.0, "std": 1.5}
    assert d["loss_weight"] == {"type": "min-snr", "gamma": 3.0}
    assert spec_hash(other) != spec_hash(spec)
    assert TSampling(**other.diffusion.t_sampling.model_dump()) == TSampling("logit-normal", 0.0, 1.5)


@pytest.mark.parametrize(("override", "message"), [
    ("diffusion.t_sampling={type: logit-normal, std: 0}", "diffusion.t_sampling.std"),
    ("diffusion.t_sampling={type: lognormal}", "diffusion.t_sampling: unknown type 'lognormal'"),
    ("diffusion.t_sampling={type: uniform, std: 1}", "diffusion.t_sampling.std"),
    ("diffusion.loss_weight={type: min-snr, gamma: -1}", "diffusion.loss_weight.gamma"),
])
def test_bad_spec_options_name_the_field(override: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(QUICKSTART, get_registry(), [override])


# --- engine wiring ---------------------------------------------------------------------------
def test_engine_trains_with_the_spec_options(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's every loss call gets the spec's t sampling and loss weight (spied on the real
    loss, which still runs), and the run finishes with finite losses."""
    import vermeer_core.step as step_module
    from engine_spec import spec_data
    from vermeer_core.distributed import init_distributed, shutdown
    from vermeer_core.engine import Engine
    from vermeer_core.plugins import load
    from vermeer_core.spec import parse_spec
    from vermeer_core.testing import read_metrics

    seen: list[tuple[TSampling, LossWeight]] = []
    real = step_module.diffusion_loss

    def spy(*args, **kwargs):
        seen.append((kwargs["t_sampling"], kwargs["loss_weight"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "diffusion_loss", spy)
    data = spec_data()
    data["diffusion"] = {**data.get("diffusion", {}), "t_sampling": {"type": "logit-normal", "mean": 0.5, "std": 0.7},
                         "loss_weight": {"type": "min-snr", "gamma": 4}}
    plugins = load()
    spec = parse_spec(data, plugins.registry)
    d = init_distributed(device="cpu")
    try:
        Engine(spec, plugins, str(tmp_path / "run"), d).run()
    finally:
        shutdown()
    assert len(seen) == 12
    assert set(seen) == {(TSampling("logit-normal", 0.5, 0.7), LossWeight("min-snr", 4.0))}
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run") if "loss" in r)
