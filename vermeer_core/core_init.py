"""Initialising a core one block at a time, the same way whether it is built for real or
sharded first.

A core is built on the ``meta`` device and initialised by its own ``reset_parameters()``
(which re-initialises its whole subtree, as the ``shallow-uvit`` core's does) group by group:
each block of ``core.blocks`` (the units FSDP shards on their own), then the rest. For each
group a template with storage for that group only (every other tensor stays on meta, where
writes are no-ops and draw no random numbers) is reset under a seed of (core seed, group),
and its tensors are handed to ``write``. So a block's values depend on the seed and its name
only: the same on one rank or many, and at most one block is ever held in full. A plain
build (:meth:`vermeer_core.model.ModelBuilder.core`) and the engine's sharded build
(:mod:`vermeer_core.meta_init`) both go through here and give identical values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from itertools import chain

import torch
from torch import Tensor, nn

__all__ = ["core_groups", "init_in_groups", "mix_seed"]


def mix_seed(*values: object) -> int:
    """A 63-bit seed from values (stable across processes and Python versions)."""
    h = hashlib.blake2b(",".join(map(str, values)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def core_groups(core: nn.Module) -> list[str]:
    """Names (relative to ``core``) of the blocks initialised on their own: ``blocks.<i>``."""
    blocks = getattr(core, "blocks", None)
    return [f"blocks.{i}" for i in range(len(blocks))] if isinstance(blocks, nn.ModuleList) else []


def init_in_groups(template: nn.Module, seed: int, write: Callable[[str, Tensor], None]) -> None:
    """Initialise ``template`` (on meta, defining ``reset_parameters``) group by group and call
    ``write(name, full_value)`` for each of its tensors; ``template`` ends on meta again."""
    inside = core_groups(template)
    for group in [*inside, None]:  # None: everything outside the blocks
        mods = [m for n, m in template.named_modules() if (_under(n, [group]) if group else not _under(n, inside))]
        for m in mods:
            m.to_empty(device="cpu", recurse=False)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(mix_seed(seed, group))
            template.reset_parameters()  # type: ignore[operator]
        ids = {id(m) for m in mods}
        with torch.no_grad():
            for n, m in template.named_modules():
                if id(m) in ids:
                    for tn, t in chain(m.named_parameters(recurse=False), m.named_buffers(recurse=False)):
                        write(f"{n}.{tn}" if n else tn, t.detach())
        for m in mods:
            m.to_empty(device="meta", recurse=False)
