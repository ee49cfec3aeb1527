"""Shared numeric assertions for tests (imported by test modules; not a test file)."""

from __future__ import annotations

import torch


def assert_same_values_and_grads(got: torch.Tensor, want: torch.Tensor, wrt: list[torch.Tensor]) -> None:
    """``got`` equals ``want`` (fp32 tolerance) and so do the gradients of their squared sums
    with respect to ``wrt``: a rewritten forward must be the written-out formula, backward too."""
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), wrt, retain_graph=True)
    g_want = torch.autograd.grad(want.square().sum(), wrt, retain_graph=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
