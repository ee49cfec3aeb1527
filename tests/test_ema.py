from __future__ import annotations

import pytest
import torch
from torch import nn

from vermeer_core.ema import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))


def test_update_is_an_exponential_moving_average_of_trainable_params():
    m = _model()
    ema = EMA(m, decay=0.9)
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m, trainable={"0.weight", "0.bias"})
    torch.testing.assert_close(ema.shadow["0.weight"], 0.9 * start["0.weight"] + 0.1 * (start["0.weight"] + 1))
    assert torch.equal(ema.shadow["1.weight"], start["1.weight"])  # not trainable: untouched


def test_frozen_params_get_no_shadow_and_swap_restores():
    m = _model()
    ema = EMA(m, decay=0.5, skip=frozenset({"1.weight"}))
    assert "1.weight" not in ema.shadow and "1.bias" in ema.shadow
    trained = {n: p.detach().clone() for n, p in m.named_parameters()}
    ema.shadow["0.weight"].fill_(7.0)
    with ema.swapped_in(m):
        assert (m[0].weight == 7.0).all()
        assert torch.equal(m[1].weight, trained["1.weight"])  # frozen: the weights themselves
    for n, p in m.named_parameters():
        assert torch.equal(p, trained[n])


def test_warmup_averages_a_short_history_and_counts_per_parameter():
    """k-diffusion's EMAWarmup form: decay(n) = min(decay, 1 - (1 + n)^-power); the first update
    copies the parameter (decay 0), and a parameter added later starts its own count."""
    m = _model()
    ema = EMA(m, decay=0.999, power=2 / 3, age={"0.weight": 1000})
    assert ema.decay_at(0) == 0.0
    assert ema.decay_at(7) == pytest.approx(1 - 8 ** (-2 / 3))
    assert ema.decay_at(10**9) == 0.999
    before = ema.shadow["0.weight"].clone()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m, trainable={"0.weight", "1.weight"})
    assert torch.equal(ema.shadow["1.weight"], m[1].weight)  # age 0: the average is the parameter
    d = ema.decay_at(1000)
    torch.testing.assert_close(ema.shadow["0.weight"], d * before + (1 - d) * m[0].weight.detach())
    assert ema.age == {"0.weight": 1001, "0.bias": 0, "1.weight": 1, "1.bias": 0}
    constant = EMA(m, decay=0.9, power=0.0)
    assert constant.decay_at(0) == 0.9
