"""Tests of the fade-in policy, as its own project runs them: unit tests, and vermeer's
growth-policy contract (``vermeer_core.testing``, a pytest plugin vermeer installs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vermeer_core.model import build_stage_model  # test-only: build real models to compare
from vermeer_core.plugins import get_plugins
from vermeer_core.spec import parse_spec
from vermeer_core.testing import GrowthPolicyContract, tiny_spec_data
from vermeer_fadein import FadeInUNet, fade_alpha

GROWTH = {"type": "fade-in", "phases": [{"name": "fade", "steps": 2}, {"name": "stable", "steps": 1}]}


class TestFadeInContract(GrowthPolicyContract):
    growth = GROWTH


def test_alpha_ramps_over_the_fade_phase_only():
    names = ["warm", "fade", "stable"]
    assert [fade_alpha(names, "fade", "warm", k, 4) for k in (0, 4)] == [0.0, 0.0]
    assert [fade_alpha(names, "fade", "fade", k, 4) for k in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert fade_alpha(names, "fade", "stable", 0, 4) == 1.0


def test_unknown_fade_phase_is_a_spec_error():
    data = tiny_spec_data({**GROWTH, "fade_phase": "nope"})
    with pytest.raises(ValueError, match="fade_phase 'nope' is not one of the phases"):
        parse_spec(data, get_plugins().registry)


def test_at_alpha_0_the_grown_model_is_the_previous_one_upsampled():
    """ProGAN's invariant: before the fade starts, growing does not change the function (on
    the down-sampled input, up-sampled output), once the previous stem/head are transferred."""
    reg = get_plugins().registry
    spec = parse_spec(tiny_spec_data(GROWTH), reg)
    prev = build_stage_model(spec, reg, 0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "trained" weights: heads are zero-initialised, which would hide everything
        for p in prev.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model = build_stage_model(spec, reg, 1, prev).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    assert isinstance(model, FadeInUNet) and model.transfers == {"fade_stem": "stem", "fade_head": "head"}
    model.fade_stem.load_state_dict(prev.stem.state_dict())  # what the engine's transfer does
    model.fade_head.load_state_dict(prev.head.state_dict())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    logsnr, captions = torch.tensor([0.5, -1.0]), ["a red circle", "two blue squares"]
    with torch.no_grad():
        model.fade_alpha.fill_(0.0)
        grown = model(x, logsnr, captions)
        before = F.interpolate(prev(F.avg_pool2d(x, 2), logsnr, captions), scale_factor=2, mode="nearest")
        assert before.abs().mean() > 1e-2  # not trivially zero
        # float error only: prev runs its convolutions channels-last on CPU and this model's
        # fade path does not, and the kernels round differently (up to ~1e-6 on some CPUs)
        torch.testing.assert_close(grown, before, rtol=1e-5, atol=1e-5)
        model.fade_alpha.fill_(1.0)  # the new path only: differs
        assert not torch.allclose(model(x, logsnr, captions), before, atol=1e-3)
