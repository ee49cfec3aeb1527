"""Checks of a spec that need the models it grows: every stage's transfers and every phase's
``trainable``, resolved on meta-device models (shapes only, no memory), so ``vermeer
validate``, ``plan`` and ``run`` refuse a wrong growth schedule (exit 2, field path) before
any run directory exists."""

from __future__ import annotations

import torch

from vermeer_core.model import VermeerModel, build_stage_model, stage_phases, stage_transfers
from vermeer_core.phases import PhaseError, resolve_phase
from vermeer_core.registry import Registry
from vermeer_core.spec import RunSpec, SpecError
from vermeer_core.transfer import TransferError

__all__ = ["check_growth"]


def check_growth(spec: RunSpec, registry: Registry, source: str = "<spec>") -> None:
    """Raise :class:`SpecError` listing every transfer that names a missing tensor or maps
    tensors of different shapes (``stages.K.growth``) and every phase whose ``trainable``
    matches nothing or trains nothing (``stages.K.growth.phases.I.trainable``; ``I`` is the
    phase's index in the policy's ``phases()``, its config index for the built-ins)."""
    problems: list[tuple[str, str]] = []
    prev: VermeerModel | None = None
    for k in range(len(spec.stages)):
        try:
            with torch.device("meta"):
                model = build_stage_model(spec, registry, k, prev=prev)
        except (NotImplementedError, RuntimeError):
            return  # a component that cannot be built on meta: the run checks the same at its start
        except ValueError as exc:  # the policy refuses this schedule (e.g. widths it cannot use)
            problems.append((f"stages.{k}.growth", str(exc)))
            raise SpecError(source, problems) from None
        try:
            stage_transfers(model, prev, k)
        except TransferError as exc:
            problems.append((f"stages.{k}.growth", f"transfers: {exc}"))
        for i, phase in enumerate(stage_phases(spec, registry, k)):
            try:
                resolve_phase(model, phase)
            except PhaseError as exc:
                problems.append((f"stages.{k}.growth.phases.{i}.trainable", f"phase {phase.name!r}: {exc}"))
        prev = model
    if problems:
        raise SpecError(source, problems)
