"""vermeer_core.diffusion: parametrisations, the loss, classifier-free guidance, sample()."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from vermeer_core.diffusion import (
    alpha_sigma,
    diffusion_loss,
    guided_denoiser,
    sample,
    target,
    to_eps,
    to_x0,
)
from vermeer_core.interfaces import TextEmbedding
from vermeer_plugins.samplers import DDIMSampler, DDPMSampler, DPMPP2MSampler
from vermeer_plugins.schedules import CosineConfig, CosineSchedule, ShiftedCosineConfig, ShiftedCosineSchedule

SCHEDULE = ShiftedCosineSchedule(ShiftedCosineConfig())


# --- parametrisations ------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_target_to_x0_to_eps_round_trip(prediction: str) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 3, 6, 6, generator=g, dtype=torch.float64)
    logsnr = torch.linspace(-12, 15, 6, dtype=torch.float64)
    alpha, sigma = alpha_sigma(logsnr)
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    pred = target(x0, eps, alpha, sigma, prediction)
    torch.testing.assert_close(to_x0(pred, x_t, alpha, sigma, prediction), x0)
    torch.testing.assert_close(to_eps(pred, x_t, alpha, sigma, prediction), eps)


def test_v_is_salimans_ho() -> None:
    x0, eps = torch.tensor([[0.5]]), torch.tensor([[-1.0]])
    alpha, sigma = torch.tensor([0.6]), torch.tensor([0.8])
    torch.testing.assert_close(target(x0, eps, alpha, sigma, "v"), torch.tensor([[0.6 * -1.0 - 0.8 * 0.5]]))


def test_per_example_coefficients_even_when_width_equals_batch() -> None:
    """A (B,) alpha must scale examples, not the last axis, also when W == B."""
    x0 = torch.ones(4, 1, 1, 4)
    eps = torch.zeros(4, 1, 1, 4)
    alpha, sigma = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4)
    v = target(x0, eps, alpha, sigma, "v")
    assert torch.equal(v, torch.zeros_like(v))
    x = to_x0(torch.zeros(4, 1, 1, 4), x0, alpha, sigma, "v")
    assert torch.equal(x[:, 0, 0, 0], alpha) and torch.equal(x[:, 0, 0, :].std(dim=1), torch.zeros(4))


def test_unknown_prediction_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="prediction must be one of v, eps"):
        target(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1), "x0")  # type: ignore[arg-type]


# --- fake models -----------------------------------------------------------------------------
def embed_lengths(captions: Sequence[str]) -> TextEmbedding:
    """Caption -> its length: pooled (B, 1); tokens one per character (so lengths differ)."""
    lengths = torch.tensor([float(len(c)) for c in captions])
    length = max(1, int(lengths.max().item()))
    mask = torch.arange(length)[None] < lengths[:, None]
    return TextEmbedding(tokens=mask[..., None].float(), mask=mask, pooled=lengths[:, None])


class KnownOutputModel:
    """raw output = len(caption) + 0.5 x + 0.1 logsnr: cond/uncond outputs known in closed form."""

    def __init__(self) -> None:
        self.forward_batches: list[int] = []
        self.encoded: list[list[str]] = []
        self.last_text: TextEmbedding | None = None

    def encode_text(self, captions: Sequence[str]) -> TextEmbedding:
        self.encoded.append(list(captions))
        return embed_lengths(captions)

    def __call__(self, x: Tensor, logsnr: Tensor, text: TextEmbedding) -> Tensor:
        if not isinstance(text, TextEmbedding):
            text = self.encode_text(text)
        self.forward_batches.append(x.shape[0])
        self.last_text = text
        return text.pooled.view(-1, 1, 1, 1) + 0.5 * x + 0.1 * logsnr.view(-1, 1, 1, 1)


def _inputs(batch: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 4, 4, generator=g), torch.linspace(-3, 4, batch)


# --- classifier-free guidance ----------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_guidance_one_is_no_guidance_in_one_call(prediction: str) -> None:
    model = KnownOutputModel()
    cond, uncond = embed_lengths(["a cat", "dog", "x"]), embed_lengths([""])
    x, logsnr = _inputs()
    got = guided_denoiser(model, cond, uncond, prediction=prediction, guidance=1.0)(x, logsnr)
    assert model.forward_batches == [3]
    alpha, sigma = alpha_sigma(logsnr)
    assert torch.equal(got, to_x0(model(x, logsnr, cond), x, alpha, sigma, prediction))
    # and it needs no unconditional embedding at all
    assert torch.equal(guided_denoiser(model, cond, None, prediction=prediction, guidance=1.0)(x, logsnr), got)


@pytest.mark.parametrize("prediction", ["v", "eps"])
@pytest.mark.parametrize("w", [0.0, 2.5, 7.0])
def test_guidance_combines_cond_and_uncond_in_one_batched_call(prediction: str, w: float) -> None:
    model = KnownOutputModel()
    captions = ["a cat", "dog", "x"]
    x, logsnr = _inputs()
    got = guided_denoiser(model, embed_lengths(captions), embed_lengths([""]), prediction=prediction, guidance=w)(
        x, logsnr
    )
    assert model.forward_batches == [6], "cond and uncond must share one forward"
    base = 0.5 * x + 0.1 * logsnr.view(-1, 1, 1, 1)
    cond = torch.tensor([5.0, 3.0, 1.0]).view(-1, 1, 1, 1) + base
    raw = base + w * (cond - base)  # uncond = base: the empty caption has length 0
    alpha, sigma = alpha_sigma(logsnr)
    torch.testing.assert_close(got, to_x0(raw, x, alpha, sigma, prediction))
    # The stacked text pads the shorter token axis with masked-out positions.
    text = model.last_text
    assert text is not None and text.tokens.shape[:2] == (6, 5)
    assert text.mask[3:].sum() == 0 and text.mask[0].all()


def test_guidance_needs_uncond_text() -> None:
    with pytest.raises(ValueError, match="unconditional"):
        guided_denoiser(KnownOutputModel(), embed_lengths(["a"]), None, prediction="v", guidance=3.0)


# --- diffusion_loss --------------------------------------------------------------------------
class SpyModel(KnownOutputModel):
    def __call__(self, x: Tensor, logsnr: Tensor, text: TextEmbedding) -> Tensor:
        if not isinstance(text, TextEmbedding):
            text = self.encode_text(text)
        self.seen = (x, logsnr)
        return super().__call__(x, logsnr, text)


def _data(batch: int = 8) -> tuple[Tensor, list[str]]:
    g = torch.Generator().manual_seed(2)
    return torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1, [f"caption {i}" for i in range(batch)]


def _loss(model, images, captions, seed: int, *, cond_drop: float = 0.1, prediction: str = "v") -> Tensor:
    return diffusion_loss(
        model,
        images,
        captions,
        schedule=SCHEDULE,
        resolution=images.shape[-1],
        prediction=prediction,  # type: ignore[arg-type]
        cond_drop=cond_drop,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_loss_is_mse_against_the_target_of_the_forward_process(prediction: str) -> None:
    model = SpyModel()
    images, captions = _data()
    loss = _loss(model, images, captions, 0, prediction=prediction)
    x_t, logsnr = model.seen
    shift = SCHEDULE.logsnr(torch.tensor([0.0, 1.0]), 8)
    assert logsnr.shape == (8,) and (logsnr <= shift[0]).all() and (logsnr >= shift[1]).all()
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in alpha_sigma(logsnr))
    eps = (x_t - alpha * images) / sigma  # the noise the loss drew, recovered from x_t
    assert abs(eps.std().item() - 1) < 0.15
    out = model(x_t, logsnr, embed_lengths(model.encoded[-1]))
    tgt = target(images, eps, alpha.flatten(), sigma.flatten(), prediction)  # type: ignore[arg-type]
    want = ((out - tgt) ** 2).mean()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)


def test_loss_is_deterministic_given_the_generator() -> None:
    images, captions = _data()
    a = _loss(KnownOutputModel(), images, captions, 3)
    assert torch.equal(a, _loss(KnownOutputModel(), images, captions, 3))
    assert not torch.equal(a, _loss(KnownOutputModel(), images, captions, 4))


def test_cond_drop_one_gives_only_empty_captions_and_zero_none() -> None:
    images, captions = _data()
    model = KnownOutputModel()
    _loss(model, images, captions, 0, cond_drop=1.0)
    assert model.encoded == [[""] * 8]
    _loss(model, images, captions, 0, cond_drop=0.0)
    assert model.encoded[-1] == captions
    model.encoded.clear()
    for seed in range(20):
        _loss(model, images, captions, seed, cond_drop=0.5)
    dropped = sum(c == "" for batch in model.encoded for c in batch)
    assert 40 < dropped < 120  # Binomial(160, 0.5): mean 80, sd ~6.3


def test_loss_rejects_bad_cond_drop() -> None:
    images, captions = _data()
    with pytest.raises(ValueError, match="cond_drop"):
        _loss(KnownOutputModel(), images, captions, 0, cond_drop=1.5)


class TinyConvModel(nn.Module):
    """A few thousand parameters: caption and log-SNR embeddings added to conv features."""

    def __init__(self, captions: Sequence[str], width: int = 32) -> None:
        super().__init__()
        self.vocab = {c: i for i, c in enumerate(["", *captions])}
        self.embed = nn.Embedding(len(self.vocab), width)
        self.time = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, 3, 3, padding=1)
        # A learned log-SNR-dependent skip, so v ~ (alpha x_t - x0) / sigma is reachable.
        self.skip = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, 1))

    def encode_text(self, captions: Sequence[str]) -> TextEmbedding:
        pooled = self.embed(torch.tensor([self.vocab[c] for c in captions]))
        mask = torch.ones(len(captions), 1, dtype=torch.bool)
        return TextEmbedding(tokens=pooled[:, None], mask=mask, pooled=pooled)

    def forward(self, x: Tensor, logsnr: Tensor, text: TextEmbedding) -> Tensor:
        if not isinstance(text, TextEmbedding):
            text = self.encode_text(text)
        cond = (text.pooled + self.time(logsnr[:, None] / 10))[:, :, None, None]
        h = nn.functional.silu(self.inp(x) + cond)
        skip = self.skip(logsnr[:, None] / 10)[:, :, None, None]
        return self.out(nn.functional.silu(self.mid(h) + cond)) + skip * x


def test_training_a_tiny_model_lowers_the_loss() -> None:
    torch.manual_seed(0)
    # Learnable data: one flat colour per caption plus a shared horizontal ramp.
    colours = torch.rand(8, 3, 1, 1, generator=torch.Generator().manual_seed(6)) * 1.6 - 0.8
    images = (colours + torch.linspace(-0.2, 0.2, 8)).expand(8, 3, 8, 8).contiguous()
    captions = [f"colour {i}" for i in range(8)]
    model = TinyConvModel(captions)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def held_out() -> float:
        with torch.no_grad():
            return sum(_loss(model, images, captions, 1000 + s).item() for s in range(4)) / 4

    before = held_out()
    gen = torch.Generator().manual_seed(5)
    for _ in range(60):
        loss = diffusion_loss(
            model, images, captions, schedule=SCHEDULE, resolution=8, prediction="v", cond_drop=0.1, generator=gen
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out()
    assert after < 0.8 * before, (before, after)  # ~0.6 with this seed; 0.57-0.68 over others


# --- sample() --------------------------------------------------------------------------------
class PointModel(KnownOutputModel):
    """A perfect model of data that is one constant image ``c``, in either parametrisation."""

    def __init__(self, c: float, prediction: str) -> None:
        super().__init__()
        self.c, self.prediction = c, prediction

    def __call__(self, x: Tensor, logsnr: Tensor, text: TextEmbedding) -> Tensor:
        if not isinstance(text, TextEmbedding):
            text = self.encode_text(text)
        self.forward_batches.append(x.shape[0])
        alpha, sigma = (v.view(-1, 1, 1, 1) for v in alpha_sigma(logsnr))
        eps = (x - alpha * self.c) / sigma
        return eps if self.prediction == "eps" else alpha * eps - sigma * self.c


@pytest.mark.parametrize("prediction", ["v", "eps"])
@pytest.mark.parametrize(
    "sampler", [DDIMSampler(), DDPMSampler(), DPMPP2MSampler()], ids=["ddim", "ddpm", "dpmpp"]
)
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sample_end_to_end_recovers_the_data(prediction: str, sampler, guidance: float) -> None:
    model = PointModel(0.25, prediction)
    captions = ["a", "bb", "ccc", "dddd"]
    out = sample(
        model,
        captions,
        schedule=SCHEDULE,
        sampler=sampler,
        resolution=8,
        steps=6,
        guidance=guidance,
        prediction=prediction,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(0),
        device="cpu",
    )
    assert out.shape == (4, 3, 8, 8)
    torch.testing.assert_close(out, torch.full_like(out, 0.25), atol=1e-4, rtol=0)
    # texts encoded once (plus one "" for CFG), never per step; one forward per grid point
    assert model.encoded == ([captions] if guidance == 1.0 else [captions, [""]])
    assert model.forward_batches == [4 if guidance == 1.0 else 8] * 7


class SmallOutputModel(KnownOutputModel):
    """v = 0.01 len(caption): x0_hat ~ alpha x_t, so samples are noise-like and partly clamped."""

    def __call__(self, x: Tensor, logsnr: Tensor, text: TextEmbedding) -> Tensor:
        if not isinstance(text, TextEmbedding):
            text = self.encode_text(text)
        return 0.01 * text.pooled.view(-1, 1, 1, 1).expand_as(x)


def test_sample_clamps_and_is_deterministic() -> None:
    def run(seed: int) -> Tensor:
        return sample(
            SmallOutputModel(),
            ["abc", "de"],
            schedule=CosineSchedule(CosineConfig()),
            sampler=DDPMSampler(),
            resolution=4,
            steps=5,
            guidance=3.0,
            prediction="v",
            generator=torch.Generator().manual_seed(seed),
            device="cpu",
            grid="t",  # its wide last step leaves these noise-like samples large enough to clamp
        )

    a = run(0)
    assert a.min() == -1 and a.max() == 1 and (a.abs() < 1).any()  # clamped, not saturated
    assert torch.equal(a, run(0)) and not torch.equal(a, run(1))


def test_sample_rejects_zero_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        sample(
            KnownOutputModel(), ["a"], schedule=SCHEDULE, sampler=DDIMSampler(), resolution=4, steps=0,
            guidance=1.0, prediction="v", generator=None, device="cpu",
        )  # fmt: skip


def test_per_example_generators_make_a_split_batch_equal_the_whole() -> None:
    """What lets world sizes 1 and N see identical randomness: example i's draws depend only
    on generator i, so two half batches give the same per-example terms as the whole batch."""
    images, captions = _data(8)
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731

    def loss(idx: list[int]) -> Tensor:
        return diffusion_loss(
            KnownOutputModel(), images[idx], [captions[i] for i in idx], schedule=SCHEDULE, resolution=8,
            prediction="v", cond_drop=0.3, generator=gens(idx),
        )

    whole = loss(list(range(8)))
    halves = (loss([0, 1, 2, 3]) + loss([4, 5, 6, 7])) / 2
    torch.testing.assert_close(whole, halves, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one per example"):
        diffusion_loss(KnownOutputModel(), images, captions, schedule=SCHEDULE, resolution=8, prediction="v",
                       cond_drop=0.0, generator=gens(range(3)))
