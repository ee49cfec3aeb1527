"""Building a stage's model without materialising it, in torchtitan's order.

The engine builds every stage's model with all its tensors on the ``meta`` device, shards it
with ``fully_shard`` (free on meta), gives each rank storage for its own shards only with
``to_empty`` on the training device, and then writes values into those shards:

* New modules of the periphery (stem, head, encoder/decoder stages, conditioning, a trainable
  text encoder) are built for real on the CPU under the stage seed, exactly as
  :func:`~vermeer_core.model.build_stage_model` builds them (a growth policy's grow-time
  initialisation included); each full value is split locally into this rank's shard and
  dropped. They are small next to the core.
* A new core (stage 0, or a policy that builds a fresh one) is built on meta and initialised
  after sharding by its own ``reset_parameters()``, one block at a time
  (:mod:`vermeer_core.core_init`): every rank computes the same full values of one block,
  keeps its shard and drops the rest, so the result is the same at any world size (and equal
  to a plain :func:`~vermeer_core.model.build_stage_model`), and at most one block is ever
  held in full.
* Tensors reused from the previous stage (the core, at a growth) are never materialised in
  full: the engine loads their sharded carried values and transfers afterwards.

On resume nothing is initialised: the checkpoint fills every tensor of the state dict. A
non-persistent buffer is not in a checkpoint, so a model with such a buffer on meta is built
the first way instead (its value then comes from the real build).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from vermeer_core.core_init import init_in_groups
from vermeer_core.model import VermeerModel, build_stage_model, deferring_core
from vermeer_core.registry import Registry

if TYPE_CHECKING:
    from vermeer_core.spec import RunSpec

__all__ = ["MetaStage", "build_meta_stage", "materialize_sharded"]


@dataclass
class MetaStage:
    """A stage's model on meta and what to write into it once it is sharded."""

    model: VermeerModel
    #: full CPU values (built for real) by tensor name, written into the shards and dropped
    values: dict[str, Tensor]
    #: new core name -> (a meta copy of it, its seed): see :mod:`vermeer_core.core_init`
    deferred: dict[str, tuple[nn.Module, int]]


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _tensors(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    return chain(model.named_parameters(), model.named_buffers())


def _meta_only(spec: RunSpec, registry: Registry, stage: int, prev: VermeerModel | None) -> VermeerModel | None:
    """The stage built entirely on meta, or None when a component cannot be, or keeps a
    non-persistent buffer that only a real build gives a value."""
    try:
        with torch.device("meta"):
            model = build_stage_model(spec, registry, stage, prev)
    except (NotImplementedError, RuntimeError):
        return None
    saved = set(model.state_dict(keep_vars=True))
    if any(t.is_meta for n, t in model.named_buffers() if n not in saved):
        return None
    return model


def _check_new(model: VermeerModel, deferred: frozenset[int]) -> None:
    """A new tensor on meta that is not a deferred core's (``deferred``: ids of their tensors
    as built) was copied from the previous stage's model, which holds structure but no
    trained values at run time: refuse it, naming the fix."""
    for name, t in _tensors(model):
        if t.is_meta and _under(name, model.new_modules) and id(t) not in deferred:
            raise ValueError(
                f"new tensor {name} is on the meta device: it was copied from the previous stage's "
                "model, which holds structure but no trained values at run time. Build new modules "
                "fresh and declare a transfer (model.transfers[new] = old) to warm-start them"
            )


def build_meta_stage(
    spec: RunSpec, registry: Registry, stage: int, prev: VermeerModel | None, *, init: bool
) -> MetaStage:
    """Stage ``stage``'s model grown from ``prev`` (a meta model), every tensor on meta.

    ``init``: a fresh stage (values for new modules are kept for :func:`materialize_sharded`);
    else a resume, whose checkpoint fills the state dict (only non-persistent buffers are kept).
    Raises ``ValueError`` when a growth policy copied a new module from ``prev``."""
    model = None if init else _meta_only(spec, registry, stage, prev)
    deferred: dict[str, tuple[nn.Module, int]] = {}
    if model is None:
        with deferring_core() as cores:
            model = build_stage_model(spec, registry, stage, prev)
        names = {id(m): n for n, m in model.named_modules()}
        deferred = {names[id(c.module)]: (c.module, c.seed) for c in cores
                    if id(c.module) in names and _under(names[id(c.module)], model.new_modules)}
        _check_new(model, frozenset().union(*(c.tensor_ids for c in cores)))
    saved = set(model.state_dict(keep_vars=True))
    values = {n: t.detach() for n, t in _tensors(model) if not t.is_meta and (init or n not in saved)}
    templates = {n: (copy.deepcopy(m), seed) for n, (m, seed) in deferred.items()} if init else {}
    model.to_empty(device="meta")  # ``values`` keep the real storage alive until written
    return MetaStage(model, values, templates)


def _write(target: Tensor, full: Tensor) -> None:
    """Copy this rank's part of the full value ``full`` into ``target`` (a shard or a
    replicated tensor). Every rank holds the same ``full``: split locally, no communication."""
    if isinstance(target, DTensor):
        local = target.to_local()
        part = distribute_tensor(full.to(local.device, target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None)
        local.copy_(part.to_local())
    else:
        target.copy_(full)


def materialize_sharded(stage: MetaStage, device: torch.device) -> None:
    """Give ``stage.model`` (sharded on meta) storage for its shards on ``device`` and write
    the values of :func:`build_meta_stage` into them; a deferred core block by block."""
    model = stage.model
    model.to_empty(device=device)
    targets = dict(_tensors(model))
    with torch.no_grad():
        for name in list(stage.values):
            _write(targets[name], stage.values.pop(name))
        for prefix, (template, seed) in stage.deferred.items():
            init_in_groups(template, seed, lambda name, value: _write(targets[f"{prefix}.{name}"], value))
        stage.deferred.clear()
