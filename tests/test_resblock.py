"""The ``resblock`` block family: residual blocks, encoder/decoder stages, stem and head."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from vermeer_core.interfaces import BlockFamily
from vermeer_core.plugins import get_registry
from vermeer_plugins.resblock import ResBlock, group_count
from numerics import assert_same_values_and_grads

COND = 6


@pytest.fixture(scope="module")
def family() -> BlockFamily:
    reg = get_registry()
    return reg.build(reg.parse("block", {"type": "resblock", "num_res_blocks": 2, "groups": 4}), "block")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomise(module: torch.nn.Module) -> None:
    """Give zero-initialised layers values, as training would."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(p.numel())) * 0.1)


def test_registered_and_follows_the_protocol(family) -> None:
    assert isinstance(family, BlockFamily)
    defaults = get_registry().parse("block", {"type": "resblock"})
    assert (defaults.num_res_blocks, defaults.groups, defaults.dropout) == (2, 32, 0.0)


@pytest.mark.parametrize("bad", [{"num_res_blocks": 0}, {"groups": 0}, {"dropout": 1.0}, {"width": 3}])
def test_config_rejects_bad_values(bad) -> None:
    with pytest.raises(ValidationError):
        get_registry().parse("block", {"type": "resblock", **bad})


@pytest.mark.parametrize(
    ("channels", "groups", "expected"), [(8, 32, 8), (64, 32, 32), (48, 32, 24), (7, 4, 1), (1, 32, 1)]
)
def test_group_count_is_the_largest_divisor_within_the_limit(channels, groups, expected) -> None:
    assert group_count(channels, groups) == expected


def test_fresh_resblock_is_the_identity(family) -> None:
    block = family.resblock(12, COND)  # 12 channels with groups=4 -> 4 groups
    x = torch.randn(2, 12, 8, 8, generator=gen())
    assert torch.equal(block(x, torch.randn(2, COND, generator=gen(1))), x)


def test_resblock_depends_on_the_conditioning() -> None:
    block = ResBlock(8, COND, groups=4)
    randomise(block)
    x = torch.randn(2, 8, 8, 8, generator=gen())
    a, b = block(x, torch.zeros(2, COND)), block(x, torch.ones(2, COND))
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_encoder_returns_skip_and_half_size_output(family) -> None:
    enc = family.encoder(8, 16, COND)
    x = torch.randn(2, 8, 16, 16, generator=gen())
    skip, down = enc(x, torch.randn(2, COND, generator=gen(1)))
    assert skip.shape == (2, 8, 16, 16) and down.shape == (2, 16, 8, 8)
    assert torch.equal(skip, x)  # fresh residual blocks pass the input through


def test_decoder_upsamples_and_uses_the_skip(family) -> None:
    dec = family.decoder(16, 4, 8, COND)
    x = torch.randn(2, 16, 8, 8, generator=gen())
    skip = torch.randn(2, 4, 16, 16, generator=gen(1))
    cond = torch.randn(2, COND, generator=gen(2))
    out = dec(x, skip, cond)
    assert out.shape == (2, 8, 16, 16)
    assert not torch.allclose(dec(x, torch.zeros_like(skip), cond), out)


@pytest.mark.parametrize(("factor", "size"), [(1, 16), (4, 64)])
def test_stem_and_head_map_pixels_to_features_and_back(family, factor, size) -> None:
    stem, head = family.stem(8, factor), family.head(8, factor)
    x = torch.randn(2, 3, size, size, generator=gen())
    h = stem(x)
    assert h.shape == (2, 8, size // factor, size // factor)
    out = head(h)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised last layer
    randomise(head)
    assert torch.count_nonzero(head(h)) > 0


def test_patchify_stem_sees_only_its_own_patch(family) -> None:
    stem = family.stem(8, 4)
    x = torch.randn(1, 3, 16, 16, generator=gen())
    y = x.clone()
    y[:, :, :4, :4] += 1.0  # change patch (0, 0) only
    diff = (stem(x) - stem(y)).abs().sum(dim=1)[0]
    assert diff[0, 0] > 0 and torch.count_nonzero(diff) == 1


def test_factor_must_be_positive(family) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        family.stem(8, 0)
    with pytest.raises(ValueError, match="positive integer"):
        family.head(8, 0)


def test_every_parameter_gets_a_gradient_once_trained_a_little(family) -> None:
    enc, dec = family.encoder(8, 8, COND), family.decoder(8, 8, 8, COND)
    randomise(enc)
    randomise(dec)
    x = torch.randn(2, 8, 8, 8, generator=gen())
    cond = torch.randn(2, COND, generator=gen(1))
    skip, down = enc(x, cond)
    dec(down, skip, cond).square().mean().backward()
    for name, p in [*enc.named_parameters(), *dec.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_resblock_is_the_scale_shift_formula():
    """``ResBlock.forward`` equals Dhariwal & Nichol's written-out
    ``x + conv2(silu(norm2(h) * (1 + scale) + shift))``, values and gradients, in fp32."""
    import torch.nn.functional as F

    block = ResBlock(8, COND, groups=4)
    randomise(block)
    x = torch.randn(2, 8, 6, 6, generator=gen(1), requires_grad=True)
    cond = torch.randn(2, COND, generator=gen(2))

    def written_out(t: torch.Tensor) -> torch.Tensor:
        h = block.conv1(F.silu(block.norm1(t)))
        scale, shift = block.cond_proj(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        return t + block.conv2(F.silu(block.norm2(h) * (1 + scale) + shift))

    got, want = block(x, cond), written_out(x)
    assert (got - x).abs().max() > 0.01  # conv2 is not zero: the branch contributes
    assert_same_values_and_grads(got, want, [x, block.cond_proj.weight])
