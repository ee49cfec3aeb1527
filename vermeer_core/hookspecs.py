"""Every hook a vermeer plugin can implement — the one module a plugin author reads.

A plugin is any importable module (or object) with functions decorated by ``hookimpl``.
Third-party plugins are found through the ``vermeer`` entry-point group::

    [project.entry-points.vermeer]
    my-growth = "my_package.growth"

The built-in components in ``vermeer_plugins`` register the same way. What each registered
component must provide (its factory's signature and the object it returns) is written down
in :mod:`vermeer_core.interfaces`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from vermeer_core.registry import Registry

PROJECT = "vermeer"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "PROJECT",
    "hookimpl",
    "hookspec",
    "vermeer_register",
    "vermeer_stage_start",
    "vermeer_phase_end",
    "vermeer_checkpoint_saved",
]


@hookspec
def vermeer_register(registry: Registry) -> None:
    """Add this plugin's components to ``registry``.

    Called once per plugin manager, right after all plugins are loaded and before any spec is
    validated. Call ``registry.add(kind, name, factory, config_model)`` for each component;
    ``kind`` is one of :data:`vermeer_core.registry.KINDS`. Adding a (kind, name) pair that is
    already registered raises ``ValueError`` naming both plugins. Import heavy optional
    dependencies lazily (inside the factory), not at module import. Returns nothing.
    """


@hookspec
def vermeer_stage_start(stage: int, resolution: int, model: Any, run_dir: str) -> None:
    """Called by the engine on every rank when a growth stage begins, after the model for
    ``stage`` has been grown (or rebuilt on resume) and before it is sharded.

    ``stage`` is the stage index (0 = core pretraining), ``resolution`` its image size,
    ``model`` the unsharded :class:`vermeer_core.model.VermeerModel`, ``run_dir`` the run's
    output URL. Return value ignored.
    """


@hookspec
def vermeer_phase_end(stage: int, phase: str, step: int, metrics: dict[str, float]) -> None:
    """Called by the engine on every rank when a training phase ends.

    ``step`` is the global optimizer step at which it ended and ``metrics`` the last logged
    values (``loss``, ``lr``, ...). Return value ignored.
    """


@hookspec
def vermeer_checkpoint_saved(url: str, step: int) -> None:
    """Called on rank 0 after a checkpoint is committed (its marker exists) at ``url``.

    Use it to copy or announce checkpoints; the checkpoint is complete and will not change.
    Return value ignored.
    """
