"""The attention kernels agree with each other and with attention over only the unmasked keys."""

from __future__ import annotations

import math

import pytest
import torch

from vermeer_core.plugins import get_registry
from vermeer_plugins import attention as attn_mod
from vermeer_plugins.attention import (
    AttentionUnavailableError,
    AutoAttention,
    available_backends,
    math_attention,
    sdpa_attention,
    xformers_attention,
)

CPU_BACKENDS = ["math", "sdpa", "auto"]
HAS_CUDA_XFORMERS = torch.cuda.is_available() and attn_mod._xformers_ops() is not None


def build(name: str):
    reg = get_registry()
    return reg.build(reg.parse("attention", {"type": name}), "attention")


def make_inputs(dtype: torch.dtype = torch.float32, device: str = "cpu", sq: int = 7, sk: int = 11,
                heads: int = 2, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, s, heads, dim, generator=g).to(device, dtype) for s in (sq, sk, sk))
    # row 0 attends everywhere, row 1 to some keys, row 2 to a single key; sk is not a multiple of 8
    mask = torch.ones(3, sk, dtype=torch.bool)
    mask[1, 3:8] = False
    mask[2, 1:] = False
    return q, k, v, mask.to(device)


def dropped_keys_reference(q, k, v, mask):
    """Attention computed per batch row over only the real keys: what masking must equal."""
    outs = []
    for b in range(q.shape[0]):
        keep = mask[b] if mask is not None else slice(None)
        qb, kb, vb = (t[b].double().transpose(0, 1) for t in (q, k[:, keep], v[:, keep]))  # (H,S,D)
        p = (qb @ kb.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1)
        outs.append((p @ vb).transpose(0, 1))
    return torch.stack(outs)


def test_registry_lists_the_four_kernels():
    assert set(get_registry().names("attention")) >= {"math", "sdpa", "xformers", "auto"}
    for name in ("math", "sdpa", "xformers", "auto"):
        assert callable(build(name))


def test_configs_take_no_fields():
    with pytest.raises(Exception, match="Extra inputs are not permitted"):
        get_registry().parse("attention", {"type": "sdpa", "scale": 2.0})


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_fp32_matches_attention_over_real_keys(name, masked):
    q, k, v, mask = make_inputs()
    mask = mask if masked else None
    out = build(name)(q, k, v, mask)
    assert out.shape == (3, 7, 2, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), dropped_keys_reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", ["sdpa", "auto"])
def test_fp32_backends_match_math(name, masked):
    q, k, v, mask = make_inputs(sq=9, sk=9, seed=1)
    mask = mask if masked else None
    torch.testing.assert_close(build(name)(q, k, v, mask), math_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_bf16_close_to_fp32_reference(name, masked):
    q, k, v, mask = make_inputs(torch.bfloat16)
    mask = mask if masked else None
    out = build(name)(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), dropped_keys_reference(q, k, v, mask), atol=3e-2, rtol=3e-2)


def test_masked_keys_have_no_influence():
    q, k, v, mask = make_inputs()
    k2, v2 = k.clone(), v.clone()
    k2[~mask], v2[~mask] = 1e3, -1e3
    for name in CPU_BACKENDS:
        fn = build(name)
        torch.testing.assert_close(fn(q, k2, v2, mask), fn(q, k, v, mask), atol=1e-6, rtol=0)
        # and the same change to real keys does change the output (the check can fail)
        assert not torch.allclose(fn(q, k2, v2, None), fn(q, k, v, None))


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_fully_masked_row_gives_zeros(name):
    q, k, v, mask = make_inputs()
    mask[1] = False
    out = build(name)(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0], math_attention(q, k, v, mask)[0], atol=1e-5, rtol=1e-5)


def test_gradients_agree_between_sdpa_and_math():
    grads = []
    for fn in (math_attention, sdpa_attention):
        q, k, v, mask = make_inputs()
        for t in (q, k, v):
            t.requires_grad_(True)
        (fn(q, k, v, mask) * torch.linspace(-1, 1, 16)).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for g_math, g_sdpa in zip(*grads):
        torch.testing.assert_close(g_sdpa, g_math, atol=1e-5, rtol=1e-5)


def test_sdpa_accepts_strided_views_from_a_fused_projection():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 6, 3, 4, 8, generator=g)  # (B, S, 3, H, D) as a fused qkv projection makes
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    torch.testing.assert_close(sdpa_attention(q, k, v), math_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_xformers_on_cpu_says_what_to_use_instead():
    q, k, v, mask = make_inputs()
    with pytest.raises(AttentionUnavailableError, match="'sdpa' or 'auto'"):
        build("xformers")(q, k, v, mask)


def test_auto_on_cpu_uses_sdpa_without_timing(monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("auto must not time kernels on CPU")

    monkeypatch.setattr(attn_mod, "_time_ms", no_timing)
    auto = AutoAttention()
    q, k, v, mask = make_inputs()
    assert auto.choose(q, k, v, mask) == "sdpa"
    auto(q, k, v, mask)
    assert auto.choices == {}


def test_available_backends():
    names = available_backends()
    assert names[:2] == ["math", "sdpa"]
    assert ("xformers" in names) == HAS_CUDA_XFORMERS


@pytest.mark.skipif(not HAS_CUDA_XFORMERS, reason="needs CUDA and xformers")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_xformers_matches_math_on_cuda(dtype, masked):
    q, k, v, mask = make_inputs(dtype, "cuda", sq=64, sk=77, heads=4, dim=64)
    mask = mask if masked else None
    ref = math_attention(q, k, v, mask).float()
    torch.testing.assert_close(xformers_attention(q, k, v, mask).float(), ref, atol=2e-2, rtol=2e-2)
    auto = AutoAttention()
    torch.testing.assert_close(auto(q, k, v, mask).float(), ref, atol=2e-2, rtol=2e-2)
    assert set(auto.choices.values()) <= {"sdpa", "xformers"} and len(auto.choices) == 1


@pytest.mark.parametrize("isolate", [True, False])
def test_timing_inside_activation_checkpointing(isolate: bool) -> None:
    from torch.utils.checkpoint import CheckpointError, checkpoint

    from vermeer_plugins.attention import isolated_autograd

    calls = {"n": 0}

    def side_work() -> None:  # what auto's timing does: forward + backward on detached copies
        y = torch.randn(4, 4, requires_grad=True)
        (y.sin() * y).sum().backward()

    def f(x: torch.Tensor) -> torch.Tensor:
        if calls["n"] == 0:
            if isolate:
                with isolated_autograd():
                    side_work()
            else:
                side_work()
        calls["n"] += 1
        return (x.exp() * x).sum()

    x = torch.randn(3, requires_grad=True)
    out = checkpoint(f, x, use_reentrant=False)
    if isolate:
        out.backward()
        torch.testing.assert_close(x.grad, x.exp() * x + x.exp())
    else:  # the failure the isolation prevents (seen on CUDA with auto + activation checkpointing)
        with pytest.raises(CheckpointError, match="different number of tensors"):
            out.backward()
