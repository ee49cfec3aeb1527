"""bf16 FSDP2 (``parallelize(..., bf16=True)``, on a CPU world of one): log-SNR reaches the
conditioning in fp32 while the image path and the core blocks compute in bf16."""

from __future__ import annotations

from typing import Any

import torch
from tiny_model_spec import tiny_spec

from vermeer_core.distributed import init_distributed, parallelize, shutdown
from vermeer_core.model import build_stage_model
from vermeer_core.plugins import get_registry


def test_bf16_fsdp_keeps_logsnr_fp32_and_activations_bf16() -> None:
    spec = tiny_spec((64,))
    model = build_stage_model(spec, get_registry(), 0)
    seen: dict[str, list[list[Any]]] = {"cond": [], "stem": [], "block": []}

    def grab(name: str):
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            seen[name].append([a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])

        return hook

    d = init_distributed(device="cpu")
    try:
        parallelize(model, d.mesh, bf16=True)
        model.cond.register_forward_pre_hook(grab("cond"))
        model.stem.register_forward_pre_hook(grab("stem"))
        model.core.blocks[0].register_forward_pre_hook(grab("block"))
        # 14.9 is 14.875 in bf16, -7.3 is -7.3125: the rounding the fix removes
        logsnr = torch.tensor([14.9, -7.3])
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        out = model(x, logsnr, ["a red circle", ""])
        # keyword form too: the root hook must leave logsnr alone however it is passed
        model(x_t=x, logsnr=logsnr, text=["a red circle", ""]).float().square().mean().backward()
        grads = [p.grad for p in model.cond.parameters()]
    finally:
        shutdown()
    assert [len(v) for v in seen.values()] == [2, 2, 2]  # positional call, keyword call
    for cond_args, stem_args, block_args in zip(seen["cond"], seen["stem"], seen["block"]):
        assert cond_args[0].dtype == torch.float32 and torch.equal(cond_args[0], logsnr)
        assert stem_args[0].dtype == torch.bfloat16 and torch.equal(stem_args[0], x.to(torch.bfloat16))
        floats = [a for a in block_args if isinstance(a, torch.Tensor) and a.is_floating_point()]
        assert floats and all(a.dtype == torch.bfloat16 for a in floats)
    # backward runs through the root hook; gradients reach the (fp32, sharded) parameters
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
