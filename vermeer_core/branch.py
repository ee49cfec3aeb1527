"""``vermeer run SPEC --from CKPT``: a new run that starts from another run's checkpoint.

The new spec must describe the same run up to the checkpoint: every field outside
``stages`` equal (as a resume requires, see :data:`~vermeer_core.spec.RESUMABLE_CHANGES`), the
stages up to and including the checkpoint's stage equal, and ``model.widths`` equal at the
resolutions those stages use. What follows is free: later stages may grow differently (another
growth policy, ``init``, phases, resolutions), or there may be more of them. So a growth-policy
author trains a core once and tries policies from its stage-boundary checkpoint; the run then
continues exactly as a resume would (same data position, same counter-based randomness), so a
branch whose spec equals its parent's reproduces the parent's later stages.

The new run directory records where it came from (``branch.json``) and starts with the
parent's history up to the checkpoint: its ``metrics.jsonl`` rows and the eval and sample
files of the stages finished by then. The parent is only read.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import fsspec

from vermeer_core.checkpoint import META_KEYS, Checkpointer
from vermeer_core.io import atomic_write_bytes, atomic_write_text, join
from vermeer_core.schedule_table import Slot, stage_ends
from vermeer_core.spec import RunSpec, SpecError, spec_changes, spec_hash

__all__ = ["BRANCH_FILE", "Branch", "branch_point", "copy_history", "spec_prefix"]

BRANCH_FILE = "branch.json"


class Branch:
    """A verified branch point: the parent checkpoint's ``url`` and its ``meta.json``."""

    def __init__(self, url: str, meta: dict[str, Any]) -> None:
        self.url, self.meta = url, meta

    @property
    def parent_run(self) -> str:
        """The parent's run directory (``RUN/checkpoints/step-N`` -> ``RUN``)."""
        return self.url.rstrip("/").rsplit("/", 2)[0]


def spec_prefix(spec: dict[str, Any], stage: int) -> dict[str, Any]:
    """The part of a resolved spec (``model_dump(mode="json")``) that determines the run up
    to the end of ``stage``: stages after it dropped, ``model.widths`` kept at the resolutions
    up to the largest that those stages use, ``name`` dropped (a branch is a new run)."""
    d = copy.deepcopy(spec)
    d.pop("name", None)
    d["stages"] = d["stages"][: stage + 1]
    top = max(int(s["resolution"]) for s in d["stages"])
    widths = d.get("model", {}).get("widths")
    if isinstance(widths, dict):
        d["model"]["widths"] = {k: v for k, v in widths.items() if int(k) <= top}
    return d


def branch_point(url: str, spec: RunSpec, *, verify: bool = True) -> Branch:
    """The committed, intact checkpoint ``url`` names (a checkpoint, or a run directory: its
    newest usable one), checked to be a point of ``spec``'s run. A damaged or missing
    checkpoint is an :class:`~vermeer_core.inference.InferenceError` (exit 1); a spec that
    disagrees with the checkpoint's before it, a :class:`SpecError` (exit 2). Reads only."""
    from vermeer_core.inference import resolve_checkpoint

    ckpt = resolve_checkpoint(url, verify=verify)
    meta = Checkpointer(ckpt, meta_keys=META_KEYS).read_meta(ckpt)
    where = f"--from {ckpt}"
    stage = int(meta["stage"])
    new = spec.model_dump(mode="json")
    if stage >= len(spec.stages):
        raise SpecError(where, [("stages", f"the checkpoint is in stage {stage}; the spec has only "
                                           f"{len(spec.stages)} stage(s), so it cannot continue from there")])
    refused, _ = spec_changes(spec_prefix(meta["spec"], stage), spec_prefix(new, stage))
    if refused:
        raise SpecError(where, [(
            "spec",
            f"differs from the checkpoint's spec up to its stage {stage} in: {'; '.join(refused)}. "
            f"A branch may change only later stages (and what a resume may change)",
        )])
    return Branch(ckpt, meta)


def copy_history(branch: Branch, out: str, slots: list[Slot], start: int, spec: RunSpec) -> list[str]:
    """Rank 0, before the branch's first write: ``branch.json``, the parent's ``metrics.jsonl``
    (the engine then trims it to ``start``, as on any resume) and the eval/sample files of the
    stages that end by ``start``. Missing parent files are skipped (a parent without ``eval:``
    has none). Returns what was copied."""
    fs, root = fsspec.core.url_to_fs(branch.parent_run)
    root = root.rstrip("/")
    names = ["metrics.jsonl"]
    for stage, end in stage_ends(slots).items():
        if end <= start:
            res = spec.stages[stage].resolution
            names += [f"eval/stage{stage}.{ext}" for ext in ("json", "png", "txt")]
            names += [f"samples/stage{stage}-{res}px.{ext}" for ext in ("png", "txt")]
    copied = [name for name in names if fs.exists(f"{root}/{name}")]
    for name in copied:
        atomic_write_bytes(join(out, name), fs.cat_file(f"{root}/{name}"))
    record = {"from": branch.url, "stage": int(branch.meta["stage"]), "step": start,
              "parent_spec_hash": spec_hash(branch.meta["spec"]), "copied": copied}
    atomic_write_text(join(out, BRANCH_FILE), json.dumps(record, indent=2) + "\n")
    return copied
