"""The run's step table: every (stage, phase) with its global step range — a pure function of
the spec, so a global step alone says where a run is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vermeer_core.interfaces import Phase
from vermeer_core.model import stage_phases
from vermeer_core.registry import Registry
from vermeer_core.spec import RunSpec

__all__ = ["Slot", "step_table", "stage_ends", "locate", "checkpoint_step"]


@dataclass(frozen=True)
class Slot:
    stage: int
    index: int  # phase index within the stage
    phase: Phase
    start: int  # global step at which the phase begins (steps start..end-1 belong to it)
    end: int


def step_table(spec: RunSpec, registry: Registry) -> list[Slot]:
    slots: list[Slot] = []
    step = 0
    for k in range(len(spec.stages)):
        for i, phase in enumerate(stage_phases(spec, registry, k)):
            slots.append(Slot(k, i, phase, step, step + phase.steps))
            step += phase.steps
    return slots


def stage_ends(slots: list[Slot]) -> dict[int, int]:
    """The global step at which each stage ends (its last phase's end), by stage."""
    return {s.stage: s.end for s in slots}  # slots are in order: a stage's last one wins


def checkpoint_step(slots: list[Slot], meta: dict[str, Any]) -> int:
    """The global step in ``slots`` at which a checkpoint with ``meta`` (its ``meta.json``)
    stands: where a resume or a ``--from`` branch starts."""
    return locate(slots, int(meta["stage"]), int(meta["phase"]), int(meta["step_in_phase"]))


def locate(slots: list[Slot], stage: int, phase_index: int, step_in_phase: int) -> int:
    """The global step of (stage, phase, step within phase) in ``slots``."""
    for s in slots:
        if s.stage == stage and s.index == phase_index:
            return s.start + min(step_in_phase, s.phase.steps)
    raise ValueError(f"the spec has no phase {phase_index} in stage {stage}")
