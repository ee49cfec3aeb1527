"""Exponential moving average of the weights, kept sharded like the parameters themselves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """``shadow[name] = decay * shadow[name] + (1 - decay) * param`` after every step.

    Works on FSDP2's DTensor parameters: each rank updates its own shard (no communication).
    """

    def __init__(
        self, model: nn.Module, decay: float, init: dict[str, Tensor] | None = None, skip: frozenset[str] = frozenset()
    ) -> None:
        """``skip``: parameters that never train (e.g. a frozen pretrained text encoder); their
        average is themselves, so no copy is kept (it would double a large encoder's memory)."""
        self.decay = decay
        init = init or {}
        self.shadow: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in skip:
                    self.shadow[name] = init[name] if name in init else p.detach().clone()

    @torch.no_grad()
    def update(self, model: nn.Module, trainable: set[str]) -> None:
        params = [p for n, p in model.named_parameters() if n in trainable]
        shadows = [self.shadow[n] for n, _ in model.named_parameters() if n in trainable]
        if params:
            torch._foreach_lerp_(shadows, [p.detach() for p in params], 1.0 - self.decay)

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
