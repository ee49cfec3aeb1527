"""``greedy`` growth with ``init: inherit``: initialise the new outer stages so that the grown
model, at step 0, computes (nearly) ``up(prev(down(x)))`` — the previous stage's model on the
2x average-pooled input, nearest-upsampled — and then learns the residual detail.

Built only on the public growth API: values that do not depend on training (pixel embedding,
average pooling, channel-identity convs) are set here on the freshly built modules; values
that do (the previous stem, head) are declared as :class:`Transfer` s, and the Shallow-UViT
ResBlocks around the core are reused as the same modules (their trained tensors load by name).

Supported growth: from a Shallow-UViT with a 2x2 patchify stem (the core-pretraining stage) to
a U-Net at twice its resolution, with ``widths[r] == widths[grid]`` for every new stage r (the
core's features are carried through the decoder channel for channel, so the head's GroupNorm
sees exactly the groups the old head saw); and from such a U-Net (or any greedy U-Net) to the
U-Net at twice its resolution (below: "U-Net to U-Net"). The path, for a 2G-pixel prev grown
to 4G:

* stem (3x3): pixels into channels 0..2 (centre tap 1), the rest 0;
* encoder 4G: ResBlocks are the identity (their last conv starts at zero); ``down`` averages
  2x2 pixel blocks (taps (1..2, 1..2) of the stride-2 kernel) — the 2G-pixel input of prev;
* encoder 2G: identity blocks; ``down`` holds prev's 2x2 patchify stem in the same taps;
* prev's ``shallow_in``, the core, prev's ``shallow_out`` (reused);
* decoders: nearest upsample, ``up`` and ``fuse`` copy channels (skips get weight 0),
  identity blocks; head: prev's GroupNorm, and its 1x1 projection averaged over the four
  sub-pixels of the pixel shuffle.

The one approximation is that last step: convolutions after a nearest upsample are the same
at every position of a 2x2 block, so they cannot pick the sub-pixel that prev's pixel shuffle
places there; the grown model outputs the mean of prev's 2x2 output block (measured in
``tests/test_inherit.py`` and ``docs/notes/inherit.md``).

U-Net to U-Net (prev a U-Net at R, grown to 2R; ``widths[2R] == widths[R]``). Prev's input and
output convolutions are 3x3 at R. On the 2x-pooled image, prev's stem is a 6x6 stride-2 kernel
at 2R, which a 3x3 stride-2 ``down`` cannot hold. On nearest-upsampled features, a 3x3 conv at
2R is not the up-sampled 3x3 conv at R either. So two modules of the new stage change shape:

* ``encoders.r2R.down`` is a :class:`PoolConv`: 2x2 average pooling, then a 3x3 conv at R that
  holds prev's stem (input channels 0..2; the new stem puts the pixels there);
* ``head`` is a :class:`LowResHead`: prev's head run on the 2x2-pooled features and nearest
  up-sampled (``head.low``, transferred from prev's ``head`` by prefix), plus a new
  full-resolution head (``head.fresh``, zero at init like every head).

Everything between is prev's own: its encoders, Shallow-UViT blocks, core and decoders
(reused). The new stage's blocks are the identity, and ``up`` and ``fuse`` copy channels. So at
step 0 the grown network outputs exactly prev's network output on the pooled input, up-sampled.
There is no sub-pixel approximation here: the new 2x2 blocks are what ``LowResHead``
up-samples. Prev's :class:`DenoiserSkip`, if it has one, nests inside the new one (``inner``).

Noise level. The model is conditioned on the log-SNR it is given; the grown model passes its
own λ to the shared conditioning, so prev runs at λ, not at the λ + 2 log 2 of the pooled
input (see docs/notes/inherit.md).

``init: inherit-denoiser`` (:class:`DenoiserSkip`) removes the remaining mismatches by starting
from prev's *denoiser* rather than its raw v output: the network runs on ``x_t / k`` (so the
pooled image is exactly prev's variance-preserving input at λ' = λ + 2 log 2; with
``diffusion.conditioning: normalized-logsnr``, which it requires, prev is also told λ'), its
output is read as prev's v at λ' and turned into prev's estimate of the clean image (averaged
over each token's pixels, up-sampled), and the detail within a token is estimated from the
input by the Wiener (linear MMSE) filter of a detail of standard deviation ``detail_std``. The
model returns the v of that estimate. So, at step 0, the grown model denoises (and samples)
as prev did on the pooled image. The plain v map instead returns no within-token v, and a
deterministic sampler then carries the within-token part of the initial noise into the image
(``tests/test_inherit.py``: a within-token std of 0.63 after 16 steps of the ``ddim`` sampler,
against 0.04).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vermeer_core.api import GrowthContext, Transfer, VermeerModel

__all__ = ["DenoiserSkip", "LowResHead", "PoolConv", "inherit_init"]

_LOG4 = 2.0 * math.log(2.0)  # log-SNR gained by 2x2 average pooling (the noise std halves)


def _pixel_stem(stem: nn.Conv2d) -> None:
    with torch.no_grad():
        stem.weight.zero_()
        for c in range(3):
            stem.weight[c, c, 1, 1] = 1.0
        if stem.bias is not None:
            stem.bias.zero_()


def _avg_pool_down(down: nn.Conv2d) -> None:
    # A stride-2 3x3 conv with padding 1 reads rows 2i-1, 2i, 2i+1 for output i: the 2x2
    # block (2i, 2i+1) is taps 1..2.
    with torch.no_grad():
        down.weight.zero_()
        for c in range(3):
            down.weight[c, c, 1:3, 1:3] = 0.25
        if down.bias is not None:
            down.bias.zero_()


def _copy_channels(conv: nn.Conv2d, n: int) -> None:
    """Output channel c = input channel c (c < n), centre tap; everything else 0."""
    k = conv.kernel_size[0] // 2
    with torch.no_grad():
        conv.weight.zero_()
        for c in range(n):
            conv.weight[c, c, k, k] = 1.0
        if conv.bias is not None:
            conv.bias.zero_()


def _stem_in_conv(in_ch: int) -> Transfer:
    """Prev's stem (out, 3, k, k) as a 3x3 conv on ``in_ch`` channels: the pixels' channels
    0..2, in the bottom-right k x k taps. k = 2 (a patchify stem): the taps a stride-2 3x3 conv
    reads for its 2x2 block; k = 3 (a U-Net stem): the whole kernel, for :class:`PoolConv`."""

    def fn(stem_w: Tensor) -> Tensor:
        k = stem_w.shape[-1]
        w = stem_w.new_zeros(stem_w.shape[0], in_ch, 3, 3)
        w[:, :3, 3 - k :, 3 - k :] = stem_w
        return w

    return Transfer(fn, ("stem.weight",))


class PoolConv(nn.Module):
    """A downsampler: 2x2 average pooling, then a 3x3 conv at the half resolution. Grown from a
    U-Net, it holds prev's 3x3 stem, applied to the pooled image."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.avg_pool2d(x, 2))


class LowResHead(nn.Module):
    """``up(low(pool(h))) + fresh(h)``: a head at half resolution (prev's), run on the 2x2-pooled
    features and nearest up-sampled, plus a head at full resolution. GroupNorm and a conv on
    nearest-upsampled features are not prev's head up-sampled; on the pooled features they
    are, exactly."""

    def __init__(self, low: nn.Module, fresh: nn.Module) -> None:
        super().__init__()
        self.low, self.fresh = low, fresh

    def forward(self, h: Tensor) -> Tensor:
        return F.interpolate(self.low(F.avg_pool2d(h, 2)), scale_factor=2, mode="nearest") + self.fresh(h)


def _subpixel_mean_w(w: Tensor) -> Tensor:  # (3*4, C, 1, 1) -> (3, C, 3, 3), centre tap
    mean = w.reshape(3, 4, w.shape[1]).mean(1)
    out = w.new_zeros(3, w.shape[1], 3, 3)
    out[:, :, 1, 1] = mean
    return out


def _subpixel_mean_b(b: Tensor) -> Tensor:  # (3*4,) -> (3,)
    return b.reshape(3, 4).mean(1)


class DenoiserSkip(nn.Module):
    """Preconditioning (see :class:`vermeer_core.api.Preconditioning`) that makes a model grown
    by 2x from ``prev`` start as prev's denoiser, up-sampled, for v-prediction.

    With ``α² = sigmoid(λ)``, ``σ² = sigmoid(-λ)`` and ``s = detail_std``:

    * 2x2 pooling keeps the signal and halves the noise std, so ``pool(x_t) = k x'`` with
      ``x'`` variance preserving at ``λ' = λ + 2 log 2`` and ``k = sqrt(α² + σ²/4)``; the
      network runs on ``x_t / k`` (``scale_input``), which pools to prev's input ``x'``;
    * at step 0 its output ``F`` is prev's v at λ' averaged over each token's pixels, i.e.
      constant on ``block`` x ``block`` pixel blocks (``block`` = resolution / grid: see the
      one approximation above). So F is read as the v of prev's estimate of the block means:
      with ``L = up(pool_block(x_t))`` (block means, nearest up-sampled) and ``H = x_t - L``
      (the within-block detail), ``x̂0_low = α' L/k - σ' F`` (the block mean of prev's
      ``α' x' - σ' v``);
    * the detail's estimate is the Wiener filter ``Ĥ0 = W H``, ``W = α s² / (α² s² + σ²)``
      (the MMSE estimate of a Gaussian detail of variance s² seen through ``α H0 + σ ε``);
    * the model returns the v of ``x̂0 = x̂0_low + Ĥ0`` at λ: ``(α x_t - x̂0) / σ``, which in
      closed form is ``a H + b L + c F`` with
      ``a = α σ (1 - s²) / (α² s² + σ²)``, ``b = -3 α σ / (4 α² + σ²)``, ``c = 1 / (2 k)``,
      all bounded (no division by a vanishing σ: safe in low precision).

    The formula of ``b`` uses ``α'/k = α'² / α`` and ``α'² = 4 α² / (4 α² + σ²)``. It holds
    for every F, so training sees a fixed, well-conditioned map: the network learns the
    residual in prev's parameterisation. Holds no tensors; nothing of it is checkpointed.

    **Nested** (``inner``: prev's own DenoiserSkip, for growth from a U-Net that was itself
    grown with ``inherit-denoiser``; ``block`` 2). Prev's v is affine in its input and network
    output, ``v_prev(y, λ') = S(y, λ') + C(λ') F_prev``. At step 0 the network output is
    ``F = up(F_prev)`` on ``y = pool(x_t) / k``. The grown estimate is
    ``x̂0 = up(α' y - σ' v_prev) + W H``, so
    ``v = a H + b L + c up(S(y, λ')) + c C(λ') F``: :meth:`skip` is the part without F and
    :meth:`gain` the factor of F. The network input is ``inner.scale_input(x_t / k, λ')``, which
    pools to the input prev's network saw. Without ``inner``, ``S = 0`` and ``C = 1``.
    """

    def __init__(self, detail_std: float, block: int, inner: DenoiserSkip | None = None) -> None:
        super().__init__()
        if not 0.0 < detail_std < 1.0:
            raise ValueError(f"detail_std must be in (0, 1), got {detail_std}")
        if block < 2 or block & (block - 1):
            raise ValueError(f"block must be a power of 2 >= 2, got {block}")
        if inner is not None and block != 2:
            raise ValueError(f"a nested DenoiserSkip reads its network output in 2x2 blocks, got block {block}")
        self.detail_std, self.block = float(detail_std), int(block)
        self.inner = inner

    def extra_repr(self) -> str:
        return f"detail_std={self.detail_std}, block={self.block}"

    @staticmethod
    def _a2_s2(logsnr: Tensor) -> tuple[Tensor, Tensor]:
        # α², σ² directly (not squares of alpha_sigma's roots): the quickstart was measured with these
        lam = logsnr.float()[:, None, None, None]
        return torch.sigmoid(lam), torch.sigmoid(-lam)

    def scale_input(self, x_t: Tensor, logsnr: Tensor) -> Tensor:
        a2, s2 = self._a2_s2(logsnr)
        x = x_t.float() * torch.rsqrt(a2 + s2 / 4)
        if self.inner is not None:
            x = self.inner.scale_input(x, logsnr.float() + _LOG4)
        return x.to(x_t.dtype)

    def gain(self, logsnr: Tensor) -> Tensor:
        """The factor of the network output in the returned v, shape (batch, 1, 1, 1)."""
        a2, s2 = self._a2_s2(logsnr)
        c = 0.5 * torch.rsqrt(a2 + s2 / 4)
        return c if self.inner is None else c * self.inner.gain(logsnr.float() + _LOG4)

    def skip(self, x_t: Tensor, logsnr: Tensor) -> Tensor:
        """The returned v for a network output of zero (float32)."""
        a2, s2 = self._a2_s2(logsnr)
        al, si = a2.sqrt(), s2.sqrt()
        d2 = self.detail_std**2
        x = x_t.float()
        low = F.interpolate(F.avg_pool2d(x, self.block), scale_factor=self.block, mode="nearest")
        a = al * si * (1.0 - d2) / (a2 * d2 + s2)
        b = -3.0 * al * si / (4.0 * a2 + s2)
        v = a * (x - low) + b * low
        if self.inner is not None:
            k_inv = torch.rsqrt(a2 + s2 / 4)
            inner = self.inner.skip(F.avg_pool2d(x, 2) * k_inv, logsnr.float() + _LOG4)
            v = v + 0.5 * k_inv * F.interpolate(inner, scale_factor=2, mode="nearest")
        return v

    def combine(self, x_t: Tensor, logsnr: Tensor, out: Tensor) -> Tensor:
        return (self.skip(x_t, logsnr) + self.gain(logsnr) * out.float()).to(out.dtype)


def _denoiser_check(ctx: GrowthContext, where: str) -> None:
    """The spec conditions ``init: inherit-denoiser`` needs, as a ValueError naming the field."""
    d = ctx.spec.diffusion
    if d.prediction != "v":
        raise ValueError(f"{where}: inherit-denoiser is derived for diffusion.prediction: v, got {d.prediction!r}")
    if d.conditioning != "normalized-logsnr":
        raise ValueError(
            f"{where}: inherit-denoiser needs diffusion.conditioning: normalized-logsnr (the core must be "
            f"told the noise level of the pooled image it sees, λ + 2 log 2), got {d.conditioning!r}"
        )


def inherit_init(
    model: VermeerModel, prev: VermeerModel, ctx: GrowthContext, *, detail_std: float | None = None
) -> VermeerModel:
    """Reshape ``model`` (a fresh ``builder.unet`` grown from ``prev``) so that it starts as
    ``up(prev(down(x)))``; returns the model with its shallow blocks and transfers set. With
    ``detail_std``, the model also gets a :class:`DenoiserSkip` (``init: inherit-denoiser``)."""
    where = f"stage {ctx.stage}: greedy init: {'inherit' if detail_std is None else 'inherit-denoiser'}"
    if detail_std is not None:
        _denoiser_check(ctx, where)
    if prev.encoders:
        return _from_unet(model, prev, ctx, where, detail_std)
    g = ctx.builder.grid
    if prev.shallow_in is None or prev.stem_factor != 2 or prev.resolution != 2 * g:
        raise ValueError(
            f"{where} grows a Shallow-UViT with a 2x2 patchify stem (resolution 2 x grid = {2 * g}) "
            f"or a U-Net into a U-Net; stage {ctx.stage - 1} is a {prev.topology()['kind']} at "
            f"{prev.resolution} with stem factor {prev.stem_factor}"
        )
    if model.encoder_resolutions != [4 * g, 2 * g]:
        raise ValueError(f"{where} expects new encoder stages [{4 * g}, {2 * g}], got {model.encoder_resolutions}")
    core_w = ctx.builder.width(g)
    bad = {r: ctx.builder.width(r) for r in (2 * g, 4 * g) if ctx.builder.width(r) != core_w}
    if bad:
        raise ValueError(
            f"{where} carries the core's {core_w} channels to the head: model.widths must be "
            f"{core_w} at {sorted(bad)} too (got {bad})"
        )
    outer, inner = f"r{4 * g}", f"r{2 * g}"
    _pixel_stem(model.stem)
    _avg_pool_down(model.encoders[outer].down)
    nn.init.zeros_(model.encoders[inner].down.weight)
    for key in (outer, inner):
        dec = model.decoders[key]
        _copy_channels(dec.up, core_w)
        _copy_channels(dec.fuse, core_w)  # the skip half of the 1x1 conv stays 0
    # the Shallow-UViT blocks around the core, reused (trained tensors load by name)
    model.shallow_in, model.shallow_out = prev.shallow_in, prev.shallow_out
    model.transfers.update(
        {
            f"encoders.{inner}.down.weight": _stem_in_conv(core_w),
            f"encoders.{inner}.down.bias": "stem.bias",
            "head.norm.weight": "head.norm.weight",
            "head.norm.bias": "head.norm.bias",
            "head.proj.weight": Transfer(_subpixel_mean_w, ("head.proj.weight",)),
            "head.proj.bias": Transfer(_subpixel_mean_b, ("head.proj.bias",)),
        }
    )
    if detail_std is not None:
        model.precondition = DenoiserSkip(detail_std, block=model.resolution // g)
    return model


def _from_unet(
    model: VermeerModel, prev: VermeerModel, ctx: GrowthContext, where: str, detail_std: float | None
) -> VermeerModel:
    """U-Net at R to U-Net at 2R (see the module docstring): the new stage's ``down`` becomes a
    :class:`PoolConv` holding prev's stem, its ``head`` a :class:`LowResHead` holding prev's."""
    r, half = model.resolution, prev.resolution
    if r != 2 * half or model.encoder_resolutions != [r, *prev.encoder_resolutions]:
        raise ValueError(
            f"{where} expects the U-Net at {half} with one new outer stage at {r}; got encoder stages "
            f"{model.encoder_resolutions} over prev's {prev.encoder_resolutions} (keep_stages must stay on)"
        )
    width, prev_width = ctx.builder.width(r), ctx.builder.width(half)
    if width != prev_width:
        raise ValueError(
            f"{where} carries prev's {prev_width} output channels at {half} to the new head: model.widths "
            f"must be {prev_width} at [{r}] too (got {width})"
        )
    inner = prev.precondition
    if detail_std is None and inner is not None:
        raise ValueError(
            f"{where}: stage {ctx.stage - 1} was grown with inherit-denoiser, so its output is not a plain v; "
            "grow from it with init: inherit-denoiser"
        )
    if inner is not None and not isinstance(inner, DenoiserSkip):
        raise ValueError(f"{where} can nest only a DenoiserSkip, stage {ctx.stage - 1} has {type(inner).__name__}")
    key = f"r{r}"
    _pixel_stem(model.stem)
    device = model.stem.weight.device
    model.encoders[key].down = PoolConv(width, prev_width).to(device)
    dec = model.decoders[key]
    _copy_channels(dec.up, width)
    _copy_channels(dec.fuse, width)  # the skip half of the 1x1 conv stays 0
    # prev's head as structure (prev holds no trained values): every tensor of it is a transfer target
    low = copy.deepcopy(prev.head).to_empty(device=device)
    with torch.no_grad():
        for t in low.parameters():
            t.zero_()
    model.head = LowResHead(low, model.head)
    if prev.shallow_in is not None:  # an inherited stage's Shallow-UViT blocks, reused
        model.shallow_in, model.shallow_out = prev.shallow_in, prev.shallow_out
    model.transfers.update(
        {
            f"encoders.{key}.down.conv.weight": _stem_in_conv(width),
            f"encoders.{key}.down.conv.bias": "stem.bias",
            "head.low": "head",
        }
    )
    if detail_std is not None:
        model.precondition = DenoiserSkip(detail_std, block=2, inner=inner)
    return model
