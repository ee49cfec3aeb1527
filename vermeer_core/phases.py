"""What a phase trains and at what lr: ``trainable`` resolved to optimizer param groups.

``trainable`` is an alias, a glob over stable parameter names, or a list of them / of
``{match, lr_mult, name}`` entries (:class:`~vermeer_core.interfaces.ParamMatch`). Aliases are
resolved here and only here (:data:`ALIASES`). Each entry becomes one param group; a parameter
belongs to the first entry that matches it. ``new`` means "created at this stage's growth"
(``model.new_modules``), whether or not a transfer warm-started it.

:class:`PhaseConfig` is the spec-side form any growth policy can put in its config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vermeer_core.interfaces import ParamMatch, Phase, Trainable

if TYPE_CHECKING:
    from vermeer_core.model import VermeerModel

__all__ = [
    "ALIASES",
    "CORE_MODULES",
    "ParamGroup",
    "PhaseConfig",
    "PhaseError",
    "TrainableEntry",
    "check_phase_names",
    "check_trainable",
    "describe_trainable",
    "entries",
    "resolve_phase",
]

#: The top-level modules that carry text-image alignment: kept by greedy growth, frozen in its
#: phase A, excluded by ``trainable: all-but-core``.
CORE_MODULES: tuple[str, ...] = ("text", "cond", "core")


def _under(name: str, prefixes: frozenset[str] | tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


#: Named parameter sets: alias -> predicate(model, parameter name).
ALIASES: dict[str, Callable[[VermeerModel, str], bool]] = {
    "all": lambda model, name: True,
    "new": lambda model, name: _under(name, model.new_modules),
    "all-but-core": lambda model, name: not _under(name, CORE_MODULES),
    "core": lambda model, name: _under(name, CORE_MODULES),
}

_GLOB = set("*?[")


class PhaseError(ValueError):
    """A phase's ``trainable`` selects nothing, names an unknown alias, or trains nothing."""


def _is_alias(match: str) -> bool:
    # parameter names always contain a dot (module.param); a bare word is an alias
    return "." not in match and not (_GLOB & set(match))


def check_trainable(match: str) -> str:
    """``match`` unchanged if it is a glob or a known alias; else a :class:`PhaseError`."""
    if not match:
        raise PhaseError("an empty pattern matches nothing")
    if _is_alias(match) and match not in ALIASES:
        raise PhaseError(
            f"unknown alias {match!r}; aliases: {', '.join(ALIASES)} (or a glob over parameter "
            "names, e.g. 'core.blocks.[6-7].*')"
        )
    return match


def entries(trainable: Trainable) -> list[ParamMatch]:
    """``trainable`` as a list of :class:`ParamMatch` (each checked by :func:`check_trainable`)."""
    items = [trainable] if isinstance(trainable, (str, ParamMatch)) else list(trainable)
    out = [x if isinstance(x, ParamMatch) else ParamMatch(x) for x in items]
    if not out:
        raise PhaseError("the list is empty: a phase must train something")
    for m in out:
        check_trainable(m.match)
    groups = [m.group for m in out]
    repeated = sorted({g for g in groups if groups.count(g) > 1})
    if repeated:
        raise PhaseError(f"group names must be unique; repeated: {', '.join(repeated)} (give entries a 'name')")
    return out


def describe_trainable(trainable: Trainable) -> str:
    """A short text for tables: ``new, core.blocks.7 x0.1``."""
    return ", ".join(m.match + (f" x{m.lr_mult:g}" if m.lr_mult != 1 else "") for m in entries(trainable))


def _matches(model: VermeerModel, match: str, name: str) -> bool:
    if _is_alias(match):
        return ALIASES[match](model, name)
    return fnmatchcase(name, match) or fnmatchcase(name, match + ".*")


@dataclass(frozen=True)
class ParamGroup:
    """One optimizer param group of a phase: ``names`` train at ``lr_mult`` x the phase lr."""

    name: str
    lr_mult: float
    names: frozenset[str]


def resolve_phase(model: VermeerModel, phase: Phase) -> list[ParamGroup]:
    """The param groups of ``phase`` on ``model`` (works on a meta-device model). Parameters a
    component built frozen (``model.always_frozen``) never train. Raises :class:`PhaseError`
    if an entry would train nothing: it matches no parameter, or only ones an earlier entry
    took or a component froze (so a phase always trains something)."""
    names = [n for n, _ in model.named_parameters()]
    taken: set[str] = set()
    groups: list[ParamGroup] = []
    for m in entries(phase.trainable):
        hit = [n for n in names if _matches(model, m.match, n)]
        mine = frozenset(n for n in hit if n not in taken and n not in model.always_frozen)
        taken |= set(hit)
        if not mine:
            why = "matches no parameter" if not hit else "matches only parameters an earlier entry took or a component froze"
            raise PhaseError(
                f"{m.match!r} {why} of the {model.resolution}x{model.resolution} model, so it would train "
                f"nothing (the model's modules: {', '.join(_top_modules(names))})"
            )
        groups.append(ParamGroup(m.group, m.lr_mult, mine))
    return groups


def _top_modules(names: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        seen[".".join(parts[:2]) if parts[0] in ("encoders", "decoders") else parts[0]] = None
    return list(seen)


# --- the spec side -------------------------------------------------------------------------
class TrainableEntry(BaseModel):
    """``{match: <alias or glob>, lr_mult: 0.1, name: <group name>}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    match: str = Field(..., description="alias (all, new, all-but-core, core) or a glob over parameter names")
    lr_mult: float = Field(1.0, gt=0, description="multiplier on the phase's lr for this group")
    name: str | None = Field(None, min_length=1, description="group name in metrics (lr/<name>); default: match")

    @field_validator("match")
    @classmethod
    def _known(cls, match: str) -> str:
        return check_trainable(match)


class PhaseConfig(BaseModel):
    """One training phase of a stage, as a spec writes it; :meth:`phase` gives the
    :class:`~vermeer_core.interfaces.Phase`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(..., min_length=1, description="phase name (unique within the stage)")
    steps: int = Field(..., gt=0, description="optimizer steps")
    lr_mult: float = Field(1.0, gt=0, description="multiplier on optim.lr")
    trainable: Union[str, list[Union[str, TrainableEntry]]] = Field(
        "all",
        description="what trains: an alias ('all', 'new' = created at this stage, 'all-but-core', "
        "'core'), a glob over parameter names ('core.blocks.[6-7].*'), or a list of them / of "
        "{match, lr_mult, name} entries (one optimizer param group each; first match wins)",
    )

    @field_validator("trainable")
    @classmethod
    def _check(cls, value: Union[str, list[Union[str, TrainableEntry]]]) -> Union[str, list[Union[str, TrainableEntry]]]:
        entries(_as_trainable(value))
        return value

    def phase(self) -> Phase:
        return Phase(self.name, self.steps, self.lr_mult, _as_trainable(self.trainable))


def _as_trainable(value: Union[str, list[Union[str, TrainableEntry]]]) -> Trainable:
    if isinstance(value, str):
        return value
    return tuple(x if isinstance(x, str) else ParamMatch(x.match, x.lr_mult, x.name) for x in value)


def check_phase_names(phases: Sequence[PhaseConfig]) -> list[PhaseConfig]:
    """A stage's phases: at least one, with unique names (a pydantic validator for configs
    that hold a list of :class:`PhaseConfig`)."""
    if not phases:
        raise ValueError("a stage needs at least one phase")
    names = [p.name for p in phases]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"phase names must be unique within a stage; repeated: {', '.join(repeated)}")
    return list(phases)
