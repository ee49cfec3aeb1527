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
        self._age: dict[str, int] = {n: age.get(n, 0) for n in self.shadow}
        # Updates gated by a device flag (see :meth:`update`) are counted on the device and
        # added to the ages of ``_pending_names`` by :meth:`settle`.
        self._pending: Tensor | None = None
        self._pending_names: set[str] = set()

    @property
    def age(self) -> dict[str, int]:
        """Updates each average has had (reading it settles device-counted updates: a sync)."""
        self.settle()
        return self._age

    def settle(self) -> None:
        """Add the updates counted on the device since the last call to the host ages (one
        device read; the engine calls it at log steps, checkpoints and phase ends)."""
        if self._pending is not None:
            n = int(self._pending.item())
            for name in self._pending_names:
                self._age[name] += n
        self._pending, self._pending_names = None, set()

    def decay_at(self, age: int) -> float:
        if self.power <= 0:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + age) ** -self.power)

    @torch.no_grad()
    def update(self, model: nn.Module, trainable: set[str], applied: Tensor | None = None) -> None:
        """One EMA step over the ``trainable`` parameters. ``applied`` (a 0-d device tensor,
        1.0 or 0.0) gates it without a host sync: 0 leaves every average and age as it was
        (the optimizer step was skipped). The trainable set must stay the same between
        :meth:`settle` calls (the engine settles at every phase end)."""
        if applied is not None and self._pending_names and self._pending_names != {
            n for n, _ in model.named_parameters() if n in trainable and n in self.shadow
        }:
            self.settle()
        groups: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        for n, p in model.named_parameters():
            if n in trainable and n in self.shadow:
                shadows, params = groups.setdefault(self._age[n], ([], []))
                shadows.append(self.shadow[n])
                params.append(p.detach())
                if applied is None:
                    self._age[n] += 1
                else:
                    self._pending_names.add(n)
        if applied is None:
            for age, (shadows, params) in groups.items():
                torch._foreach_lerp_(shadows, params, 1.0 - self.decay_at(age))
            return
        done = self._pending if self._pending is not None else torch.zeros((), device=applied.device)
        for age, (shadows, params) in groups.items():
            if self.power <= 0:
                w = (1.0 - self.decay) * applied
            else:  # decay_at(age + done), on the device (float64 like the host formula)
                n = (done.double() + age)
                w = (1.0 - torch.clamp(1.0 - (1.0 + n) ** -self.power, max=self.decay)) * applied.double()
            # shadow += w * (param - shadow): lerp has no tensor-weight overload (a 0-d tensor
            # would be read as a Python scalar: a sync), multiplication does
            diff = torch._foreach_sub(params, shadows)
            torch._foreach_mul_(diff, w.to(shadows[0].dtype))
            torch._foreach_add_(shadows, diff)
        self._pending = done + applied

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
