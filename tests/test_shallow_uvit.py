"""The shallow-uvit core: shapes, identity at init, gradients, text masking, parameter names."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from vermeer_core.interfaces import TextEmbedding
from vermeer_core.plugins import get_registry
from vermeer_plugins.shallow_uvit import ShallowUViTCore, sincos_2d
from numerics import assert_same_values_and_grads

CHANNELS, GRID, COND, TEXT_DIM, TEXT_LEN = 6, 4, 12, 10, 5


def make_core(attention: str = "sdpa", seed: int = 0, **config) -> ShallowUViTCore:
    reg = get_registry()
    cfg = reg.parse("core", {"type": "shallow-uvit", "width": 32, "depth": 2, "heads": 4, **config})
    attend = reg.build(reg.parse("attention", {"type": attention}), "attention")
    torch.manual_seed(seed)
    return reg.build(cfg, "core", channels=CHANNELS, grid=GRID, cond_dim=COND, text_dim=TEXT_DIM, attention=attend)


def perturb(core: ShallowUViTCore, seed: int = 1) -> ShallowUViTCore:
    """Give the zero-initialised layers (modulation, out_proj) nonzero weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in [b.ada for b in core.blocks] + [core.final_ada, core.out_proj]:
            linear.weight.copy_(0.3 * torch.randn(linear.weight.shape, generator=g))
            linear.bias.copy_(0.1 * torch.randn(linear.bias.shape, generator=g))
    return core


def inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, CHANNELS, GRID, GRID, generator=g)
    cond = torch.randn(2, COND, generator=g)
    mask = torch.tensor([[True, True, False, False, False], [True] * TEXT_LEN])
    text = TextEmbedding(torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g), mask, torch.randn(2, TEXT_DIM, generator=g))
    return x, cond, text


def test_registry_lists_core_and_attention():
    reg = get_registry()
    assert "shallow-uvit" in reg.names("core")
    assert set(reg.names("attention")) >= {"math", "sdpa", "xformers", "auto"}


def test_config_validation_messages():
    reg = get_registry()
    with pytest.raises(ValidationError, match=r"width \(30\) must be divisible by heads \(4\)"):
        reg.parse("core", {"type": "shallow-uvit", "width": 30, "heads": 4})
    with pytest.raises(ValidationError, match="Extra inputs"):
        reg.parse("core", {"type": "shallow-uvit", "widht": 32})
    cfg = reg.parse("core", {"type": "shallow-uvit"})
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, cfg.dropout) == (512, 8, 8, 4.0, True, 0.0)


def test_output_shape_and_blocks_list():
    core = perturb(make_core(depth=3))
    x, cond, text = inputs()
    out = core(x, cond, text)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert isinstance(core.blocks, torch.nn.ModuleList) and len(core.blocks) == 3


def test_fresh_core_is_the_identity():
    core = make_core()
    x, cond, text = inputs()
    assert torch.equal(core(x, cond, text), x)
    # each block on its own is the identity too (zero gates), not only the zero out_proj
    tokens = torch.randn(2, GRID * GRID, 32)
    ctx = torch.randn(2, TEXT_LEN, 32)
    assert torch.equal(core.blocks[0](tokens, cond, ctx, text.mask), tokens)
    # and once trained it is not (the check above can fail)
    assert not torch.allclose(perturb(core)(x, cond, text), x)


def test_open_gates_keep_the_core_the_identity_but_not_its_blocks():
    core = make_core(gate_init=1.0)
    x, cond, text = inputs()
    assert torch.equal(core(x, cond, text), x)  # zero out_proj
    tokens = torch.randn(2, GRID * GRID, 32)
    ctx = torch.randn(2, TEXT_LEN, 32)
    assert not torch.allclose(core.blocks[0](tokens, cond, ctx, text.mask), tokens)
    gates = core.blocks[0].ada(torch.zeros(1, cond.shape[1])).view(9, 32)
    assert gates[[2, 5, 8]].eq(1.0).all() and gates[[0, 1, 3, 4, 6, 7]].eq(0.0).all()
    # and a gradient reaches the branch weights at the first step (adaLN-Zero gives them none)
    core(x + 0, cond, text).sum().backward()
    assert core.blocks[0].cross.kv.weight.grad is None or core.blocks[0].cross.kv.weight.grad.abs().sum() == 0
    core.zero_grad()
    core.out_proj.weight.data.normal_()
    core(x, cond, text).sum().backward()
    assert core.blocks[0].cross.kv.weight.grad.abs().sum() > 0
    zero = make_core()
    zero.out_proj.weight.data.normal_()
    zero(x, cond, text).sum().backward()
    assert zero.blocks[0].cross.kv.weight.grad.abs().sum() == 0


def test_every_parameter_gets_a_gradient():
    core = perturb(make_core())
    x, cond, text = inputs()
    core(x, cond, text).square().mean().backward()
    missing = [n for n, p in core.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_padded_text_tokens_do_not_influence_output():
    core = perturb(make_core())
    x, cond, text = inputs()
    tokens = text.tokens.clone()
    tokens[0, 2:] = 100.0  # row 0's padding
    changed = TextEmbedding(tokens, text.mask, text.pooled)
    torch.testing.assert_close(core(x, cond, changed), core(x, cond, text), atol=1e-6, rtol=0)
    # a real token does matter
    tokens[0, 1] = 100.0
    assert not torch.allclose(core(x, cond, TextEmbedding(tokens, text.mask, text.pooled))[0], core(x, cond, text)[0])


def test_all_padding_caption_is_finite():
    core = perturb(make_core())
    x, cond, text = inputs()
    mask = text.mask.clone()
    mask[0] = False
    assert torch.isfinite(core(x, cond, TextEmbedding(text.tokens, mask, text.pooled))).all()


@pytest.mark.parametrize("qk_norm", [True, False])
def test_math_and_sdpa_cores_agree(qk_norm):
    a = perturb(make_core("math", qk_norm=qk_norm))
    b = make_core("sdpa", seed=5, qk_norm=qk_norm)
    b.load_state_dict(a.state_dict())
    x, cond, text = inputs()
    torch.testing.assert_close(b(x, cond, text), a(x, cond, text), atol=1e-5, rtol=1e-5)


def test_parameter_names_follow_the_scheme():
    names = {n for n, _ in make_core(depth=4).named_parameters()}
    expected = {
        "blocks.3.attn.qkv.weight", "blocks.3.attn.proj.weight", "blocks.3.attn.q_norm.weight",
        "blocks.3.cross.q.weight", "blocks.3.cross.kv.weight", "blocks.3.cross.proj.weight",
        "blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.weight", "blocks.3.ada.weight",
        "in_proj.weight", "pos_embed", "text_proj.weight", "final_ada.weight", "out_proj.weight",
    }
    assert expected <= names
    # the block index is the only number in a name: no anonymous nn.Sequential indices
    assert all(not part.isdigit() for n in names for part in n.split(".")[2 if n.startswith("blocks.") else 0:])


def test_projections_reach_attention_as_views():
    """The fused qkv / kv outputs are unbound into (B,S,H,D) views, never permuted copies."""
    seen = []

    def spy(q, k, v, key_mask=None):
        seen.append(v)
        return torch.zeros_like(q)

    core = make_core(depth=1, qk_norm=False)
    for block in core.blocks:
        block.attn.attention = block.cross.attention = spy
    core(*inputs())
    self_v, cross_v = seen
    assert self_v.shape == (2, GRID * GRID, 4, 8) and self_v.stride()[1] == 3 * 32
    assert cross_v.shape == (2, TEXT_LEN, 4, 8) and cross_v.stride()[1] == 2 * 32


def test_wrong_grid_is_a_clear_error():
    core = make_core()
    _, cond, text = inputs()
    with pytest.raises(ValueError, match="built for"):
        core(torch.randn(2, CHANNELS, 8, 8), cond, text)


def test_sincos_table_distinguishes_positions():
    table = sincos_2d(GRID, 32)
    assert table.shape == (GRID * GRID, 32)
    assert torch.cdist(table, table).add(torch.eye(GRID * GRID)).min() > 0.1


def test_block_is_the_gated_adaln_formula():
    """``Block.forward`` equals DiT's written-out
    ``x + gate * branch(norm(x) * (1 + scale) + shift)``, values and gradients, in fp32."""
    import torch.nn.functional as F

    core = perturb(make_core())
    blk = core.blocks[0]
    x, cond, text = inputs()
    tokens = torch.randn(2, GRID * GRID, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    c = F.silu(torch.randn(2, COND, generator=torch.Generator().manual_seed(4)))
    ctx = core.text_norm(core.text_proj(text.tokens)).detach()

    def written_out(t: torch.Tensor) -> torch.Tensor:
        m = blk.ada(c)[:, None, :].chunk(9, dim=-1)
        t = t + m[2] * blk.attn(blk.norm1(t) * (1 + m[1]) + m[0])
        t = t + m[5] * blk.cross(blk.norm2(t) * (1 + m[4]) + m[3], ctx, text.mask)
        return t + m[8] * blk.mlp(blk.norm3(t) * (1 + m[7]) + m[6])

    got, want = blk(tokens, c, ctx, text.mask), written_out(tokens)
    assert (got - tokens).abs().max() > 0.1  # the gates are open: the branches contribute
    assert_same_values_and_grads(got, want, [tokens, blk.ada.weight])
