"""Transfers: how a growth policy initialises tensors of a new stage from *trained* tensors of
the previous one (warm starts, blocks copied to new depths, weights moved under new names).

A policy's ``grow()`` builds structure only (it never sees trained values: see
:class:`vermeer_core.interfaces.GrowthPolicy`) and records ``model.transfers``, a mapping

    new tensor name or module prefix -> old tensor name or module prefix | Transfer

which :func:`resolve_transfers` expands to one :class:`Transfer` per new tensor and checks
against both models' shapes (on ``meta`` models for ``vermeer validate``/``plan``, before any
training in a run). The engine then applies the plan to the sharded weights, the EMA shadow
and the AdamW state (:mod:`vermeer_core.engine`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

__all__ = ["Transfer", "TransferError", "TransferMap", "resolve_transfers"]


@dataclass(frozen=True)
class Transfer:
    """The new tensor is ``fn(*sources)`` of the previous stage's trained tensors (full,
    unsharded tensors in, a full tensor of the target's shape out; it runs once per rank
    and per state: weights, then EMA shadows, then, with ``moments``, each AdamW moment).

    ``fn=None`` copies the single source. ``moments``: apply ``fn`` to the AdamW moments too
    (``exp_avg``/``exp_avg_sq``; ``step`` = the sources' largest) — right when ``fn`` copies,
    slices or permutes, wrong when it mixes tensors; otherwise the target's moments start
    fresh. A plain string in ``model.transfers`` means ``Transfer(None, (source,))``.
    """

    fn: Callable[..., Tensor] | None
    sources: tuple[str, ...]
    moments: bool = False

    def __post_init__(self) -> None:
        sources = (self.sources,) if isinstance(self.sources, str) else tuple(self.sources)
        object.__setattr__(self, "sources", sources)  # a name or any sequence of names
        if not self.sources:
            raise ValueError("a Transfer needs at least one source tensor")
        if self.fn is None and len(self.sources) != 1:
            raise ValueError(f"a Transfer without fn copies one source, got {list(self.sources)}")

    @property
    def copies(self) -> bool:
        """True for a plain copy: weights, EMA and optimizer state all carry over."""
        return self.fn is None


#: What a growth policy records on its model: new name/prefix -> old name/prefix | Transfer.
TransferMap = dict[str, Union[str, Transfer]]


class TransferError(ValueError):
    """A transfer names a tensor that does not exist or maps tensors of different shapes."""


def _under(names: Mapping[str, object], prefix: str) -> list[str]:
    return [n for n in names if n.startswith(prefix + ".")]


def _describe(name: str, shapes: Mapping[str, torch.Size]) -> str:
    return f"{name} {tuple(shapes[name])}"


def resolve_transfers(
    transfers: Mapping[str, str | Transfer],
    new_shapes: Mapping[str, torch.Size],
    old_shapes: Mapping[str, torch.Size],
    where: str = "",
) -> dict[str, Transfer]:
    """One :class:`Transfer` per target tensor, checked: targets exist in ``new_shapes``,
    sources in ``old_shapes``, shapes agree (a copy: same shape; a ``fn``: evaluated once
    on ``meta`` tensors, if it can be, to check its output shape). Prefix entries expand to
    every tensor under the prefix; a longer (more specific) key wins. ``where`` prefixes
    error messages (e.g. "stage 1: ")."""
    plan: dict[str, Transfer] = {}
    for key in sorted(transfers, key=len):  # shorter prefixes first, specific keys overwrite
        value = transfers[key]
        if isinstance(value, Transfer):
            if key not in new_shapes:
                raise TransferError(
                    f"{where}transfer {key} <- {list(value.sources)}: the new model has no tensor "
                    f"{key!r} (a Transfer with fn targets one tensor by its full name)"
                )
            missing = [s for s in value.sources if s not in old_shapes]
            if missing:
                raise TransferError(
                    f"{where}transfer {key} <- {list(value.sources)}: the previous stage has no "
                    f"tensor {missing[0]!r}"
                )
            _check_fn(key, value, new_shapes, old_shapes, where)
            plan[key] = value
            continue
        if not isinstance(value, str):
            raise TransferError(f"{where}transfer {key}: the source must be a name or a Transfer, got {value!r}")
        if key in new_shapes:
            pairs = [(key, value)]
        else:
            below = _under(new_shapes, key)
            if not below:
                raise TransferError(
                    f"{where}transfer {key} <- {value}: the new model has no tensor or module {key!r}"
                )
            pairs = [(n, value + n[len(key):]) for n in below]
        if value not in old_shapes and not _under(old_shapes, value):
            raise TransferError(
                f"{where}transfer {key} <- {value}: the previous stage has no tensor or module {value!r}"
            )
        for new, old in pairs:
            if old not in old_shapes:
                raise TransferError(
                    f"{where}transfer {new} <- {old}: the previous stage has no tensor {old!r} "
                    f"(from the transfer {key} <- {value})"
                )
            if tuple(new_shapes[new]) != tuple(old_shapes[old]):
                raise TransferError(
                    f"{where}transfer {new} <- {old}: shapes differ: {_describe(new, new_shapes)} "
                    f"vs {_describe(old, old_shapes)}"
                )
            plan[new] = Transfer(None, (old,))
    return plan


def _check_fn(
    key: str, t: Transfer, new_shapes: Mapping[str, torch.Size], old_shapes: Mapping[str, torch.Size], where: str
) -> None:
    args = [torch.empty(old_shapes[s], device="meta") for s in t.sources]
    if t.fn is None:
        out_shape = tuple(old_shapes[t.sources[0]])
    else:
        try:
            out = t.fn(*args)
        except Exception:  # noqa: BLE001 - data-dependent fns cannot run on meta; the engine checks the real result
            return
        out_shape = tuple(out.shape)
    if out_shape != tuple(new_shapes[key]):
        srcs = ", ".join(_describe(s, old_shapes) for s in t.sources)
        raise TransferError(
            f"{where}transfer {key} <- {list(t.sources)}: shapes differ: {_describe(key, new_shapes)} "
            f"but the transfer gives {out_shape} (from {srcs})"
        )


def check_result(key: str, t: Transfer, value: Tensor, shape: torch.Size, where: str = "") -> None:
    """The shape check of a ``fn`` transfer on its real result (``fn`` may not run on meta)."""
    if tuple(value.shape) != tuple(shape):
        raise TransferError(
            f"{where}transfer {key} <- {list(t.sources)}: shapes differ: {key} {tuple(shape)} but the "
            f"transfer gives {tuple(value.shape)}"
        )
