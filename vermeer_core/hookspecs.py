"""Every hook a vermeer plugin can implement — the one module a plugin author reads.

A plugin is any importable module (or object) with functions decorated by ``hookimpl``.
Third-party plugins are found through the ``vermeer`` entry-point group::

    [project.entry-points.vermeer]
    my-growth = "my_package.growth"

The built-in components in ``vermeer_plugins`` implement the same hooks (they are registered
from an explicit list, before any entry point). What each registered
component must provide (its factory's signature and the object it returns) is written down
in :mod:`vermeer_core.interfaces`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import argparse

    import torch
    from torch import nn

    from vermeer_core.interfaces import Phase
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
    "vermeer_phase_start",
    "vermeer_step_end",
    "vermeer_phase_end",
    "vermeer_checkpoint_saved",
    "vermeer_data_commands",
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
    ``model`` the unsharded :class:`vermeer_core.model.VermeerModel` on the ``meta`` device
    (structure, names and shapes; its values are written after sharding, see
    :mod:`vermeer_core.meta_init`), ``run_dir`` the run's output URL. Return value ignored.
    """


@hookspec
def vermeer_phase_start(
    stage: int, phase: Phase, step: int, phase_step: int, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Called by the engine on every rank when it starts (or, on resume, continues) a training
    phase: after the phase's trainable parameters are set and its optimizer is built (with any
    resumed state), before the phase's first step runs.

    ``stage`` is the stage index, ``phase`` the :class:`~vermeer_core.interfaces.Phase` the
    growth policy returned (``name``, ``steps``, ...), ``step`` the global number of optimizer
    steps done before this one (0-based: the next step is ``step + 1``), ``phase_step`` how many
    of them belong to this phase (0, or more when resuming mid-phase). ``model`` is the
    *sharded* model (FSDP2: parameters are DTensors; buffers are plain tensors on every rank),
    ``optimizer`` the phase's ``torch.optim.Optimizer`` over exactly the trainable parameters.
    Set state that is a function of ``phase_step`` here (e.g. a fade-in weight), so a resumed
    run matches an uninterrupted one; don't change learning rates here: the engine sets each
    group's lr at every step from its schedule. Return value ignored.
    """


@hookspec
def vermeer_step_end(
    stage: int, phase: Phase, step: int, phase_step: int, model: nn.Module, metrics: dict[str, Any] | None,
    skipped: torch.Tensor,
) -> None:
    """Called by the engine on every rank after each training step, before that step's
    checkpoint is saved, so state a plugin changes here is in that checkpoint.

    ``step`` is the global step just done (1-based, as in ``metrics.jsonl``), ``phase_step``
    the steps done in ``phase`` so far (1 after its first step), ``model`` the sharded model.
    ``metrics`` is the record just written to ``metrics.jsonl`` on a log step (every
    ``train.log_every`` steps and a phase's last step), else ``None``. ``skipped`` is a 0-d
    tensor on the training device, 1.0 when the step's update was skipped for a non-finite
    loss or gradient (the engine decides that on the device and reads it only at log steps).
    The engine never reads a device value just for this hook, so it costs no host-device
    sync; read tensors (``skipped`` included) yourself only when you must. Return value ignored.
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


@hookspec
def vermeer_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add this plugin's ``vermeer data <ACTION>`` commands (as tox's ``tox_add_option``).

    ``subparsers`` is the ``data`` command's ``argparse`` sub-parser collection: call
    ``p = subparsers.add_parser(name, help=...)``, add arguments, and
    ``p.set_defaults(func=handler)`` where ``handler(args: argparse.Namespace) -> int`` returns
    the exit status (0 = success). A handler reports a user error by raising
    :class:`~vermeer_core.errors.VermeerError` (e.g. ``DataError``): the CLI prints its message,
    no traceback, and exits 1. Called once per CLI invocation for each plugin, in registration
    order (built-ins first); a name another plugin already added is an error naming both.
    Import heavy dependencies inside the handler, not here. Returns nothing.
    """
