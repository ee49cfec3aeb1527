"""Exponential moving average of the weights, kept sharded like the parameters themselves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """``shadow[name] = d * shadow[name] + (1 - d) * param`` after every step, with a warmup:
    a parameter updated ``n`` times before uses ``d = min(decay, 1 - (1 + n)^-power)`` (the
    inverse-decay EMA warmup of k-diffusion's ``EMAWarmup`` with inv_gamma=1; power 2/3 is its
    suggested value). Each parameter counts its own updates, so layers added at a growth
    average over their own short history instead of being held at their initialisation.

    Works on FSDP2's DTensor parameters: each rank updates its own shard (no communication).
    """

    def __init__(
        self, model: nn.Module, decay: float, init: dict[str, Tensor] | None = None,
        skip: frozenset[str] = frozenset(), *, power: float = 0.0, age: dict[str, int] | None = None,
    ) -> None:
        """``skip``: parameters that never train (e.g. a frozen pretrained text encoder); their
        average is themselves, so no copy is kept (it would double a large encoder's memory).
        ``age``: updates each carried average has had (new ones start at 0)."""
        self.decay = decay
        self.power = power
        init = init or {}
        self.shadow: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in skip:
                    self.shadow[name] = init[name] if name in init else p.detach().clone()
        age = age or {}
        self.age: dict[str, int] = {n: age.get(n, 0) for n in self.shadow}

    def decay_at(self, age: int) -> float:
        if self.power <= 0:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + age) ** -self.power)

    @torch.no_grad()
    def update(self, model: nn.Module, trainable: set[str]) -> None:
        groups: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        for n, p in model.named_parameters():
            if n in trainable and n in self.shadow:
                shadows, params = groups.setdefault(self.age[n], ([], []))
                shadows.append(self.shadow[n])
                params.append(p.detach())
                self.age[n] += 1
        for age, (shadows, params) in groups.items():
            torch._foreach_lerp_(shadows, params, 1.0 - self.decay_at(age))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Temporarily put the EMA weights into ``model`` (for sampling)."""
        backup = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.shadow:
                    backup[name] = p.detach().clone()
                    p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in backup:
                        p.copy_(backup[name])
