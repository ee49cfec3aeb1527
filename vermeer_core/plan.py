"""``vermeer plan``: per stage and phase — parameters, forward FLOPs, memory — before a run.

Everything is computed on the meta device (shapes only), so planning an 8B model costs no
memory and little time. FLOPs are *measured* by ``torch.utils.flop_counter.FlopCounterMode``
over one forward pass (matmuls, convolutions, attention; elementwise ops are not counted).
Activation memory is the sum of the tensors autograd saves for backward in that forward
(``saved_tensors_hooks``), per image, weights excluded — an estimate: a tensor saved twice is
counted twice, and allocator fragmentation and temporaries are not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vermeer_core.core_init import core_groups
from vermeer_core.distributed import sharded_units
from vermeer_core.model import VermeerModel, build_stage_model, select_trainable
from vermeer_core.phases import describe_trainable
from vermeer_core.registry import Registry
from vermeer_core.schedule_table import step_table
from vermeer_core.spec import RunSpec

__all__ = [
    "measure_forward", "plan_rows", "print_plan", "stage_forward_flops", "total_train_tflop", "transition_bytes",
]

_CAPTION = "a small red circle above a large blue square"


def measure_forward(model: VermeerModel, resolution: int) -> tuple[int, int, int]:
    """(forward FLOPs, bytes saved for backward, the same with activation checkpointing) of one
    image through a meta-device ``model``.

    With checkpointing (per core block and encoder/decoder stage, as ``parallelize`` applies
    it), a unit keeps only its inputs, and one unit's internals live again during its
    recomputation: estimate = saved outside units + unit inputs + the largest unit's internals.
    """
    params = {id(p) for p in model.parameters()}
    units = [u for u in sharded_units(model) if u is not model.text]
    inside: list[int] = []  # bytes saved inside the unit currently running (stack)
    totals = {"all": 0, "outside": 0, "unit_inputs": 0, "max_unit": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params:  # weights (and their views) are not activations
            n = t.numel() * t.element_size()
            totals["all"] += n
            if inside:
                inside[-1] += n
            else:
                totals["outside"] += n
        return t

    def pre(_m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        totals["unit_inputs"] += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        inside.append(0)

    def post(_m: torch.nn.Module, _args: Any, _out: Any) -> None:
        totals["max_unit"] = max(totals["max_unit"], inside.pop())

    handles = [h for u in units for h in (u.register_forward_pre_hook(pre), u.register_forward_hook(post))]
    x = torch.zeros(1, 3, resolution, resolution, device="meta")
    logsnr = torch.zeros(1, device="meta")
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, logsnr, [_CAPTION])
    finally:
        for h in handles:
            h.remove()
    checkpointed = totals["outside"] + totals["unit_inputs"] + totals["max_unit"]
    return int(counter.get_total_flops()), totals["all"], checkpointed


def stage_forward_flops(spec: RunSpec, registry: Registry, stage: int) -> int:
    """Forward FLOPs per image of ``stage``'s model (built on the meta device)."""
    model: VermeerModel | None = None
    with torch.device("meta"):
        for k in range(stage + 1):
            model = build_stage_model(spec, registry, k, prev=model)
    assert model is not None
    return measure_forward(model, spec.stages[stage].resolution)[0]


def transition_bytes(
    model: VermeerModel, prev: VermeerModel | None, prev_trainable: int, ema: bool, world_size: int
) -> tuple[int, int]:
    """Per-rank peak bytes of the step that builds ``model`` (grown from ``prev``), as the
    engine does it (:mod:`vermeer_core.meta_init`): (what the previous stage carries in,
    what the new stage adds). Carried: fp32 weights, EMA and AdamW moments of ``prev``'s last
    phase, all sharded. Added: the new stage's weight shards, EMA shards of its new tensors,
    and, held in full on every rank for a moment, the new periphery (built for real) plus
    the largest group of a new core (initialised one block at a time). Transfers' copies and
    allocator slack are not counted."""
    params = {n: p.numel() for n, p in model.named_parameters()}
    new = {n: c for n, c in params.items() if any(n == m or n.startswith(m + ".") for m in model.new_modules)}
    deferred = "core" in model.new_modules and callable(getattr(model.core, "reset_parameters", None))
    groups = [0]
    if deferred:
        blocks = {f"core.{g}" for g in core_groups(model.core)}
        groups = [sum(c for n, c in new.items() if n.startswith(g + ".")) for g in blocks]
        groups.append(sum(c for n, c in new.items() if n.startswith("core.") and not any(
            n.startswith(g + ".") for g in blocks)))
    full_now = sum(c for n, c in new.items() if not (deferred and n.startswith("core."))) + max(groups)
    carried = 0
    if prev is not None:
        total_prev = sum(p.numel() for p in prev.parameters())
        carried = 4 * (total_prev * (2 if ema else 1) + 2 * prev_trainable) // world_size
    added = 4 * (sum(params.values()) + (sum(new.values()) if ema else 0)) // world_size + 4 * full_now
    return carried, added


def plan_rows(spec: RunSpec, registry: Registry, world_size: int = 1, start: int = 0) -> list[dict[str, Any]]:
    """One row per stage and phase. ``start`` is the global step a run starts at (a branch's
    ``--from`` point): ``steps_to_train`` and ``train_tflop`` count only the steps from there
    on, so a phase the parent already trained costs nothing."""
    rows: list[dict[str, Any]] = []
    slots = step_table(spec, registry)
    model: VermeerModel | None = None
    prev_trainable = 0
    for k, stage in enumerate(spec.stages):
        prev = model
        with torch.device("meta"):
            model = build_stage_model(spec, registry, k, prev=model)
        carried, added = transition_bytes(model, prev, prev_trainable, spec.ema is not None, world_size)
        flops, act_full, act_ckpt = measure_forward(model, stage.resolution)
        act = act_ckpt if spec.train.activation_checkpointing else act_full
        total = sum(p.numel() for p in model.parameters())
        per_rank_batch = stage.batch_size / world_size
        for slot in (s for s in slots if s.stage == k):
            trainable_names = select_trainable(model, slot.phase.trainable)
            trainable = sum(p.numel() for n, p in model.named_parameters() if n in trainable_names)
            # fp32 parameters (4 B) for all; fp32 gradient (4 B) + AdamW moments (8 B) for trainable
            state = (4 * total + 12 * trainable) / world_size
            to_train = max(0, slot.end - max(slot.start, start))
            rows.append({
                "stage": k,
                "resolution": stage.resolution,
                "topology": model.topology().get("kind"),
                "phase": slot.phase.name,
                "steps": slot.phase.steps,
                "steps_to_train": to_train,
                "trainable_set": describe_trainable(slot.phase.trainable),
                "params_total": total,
                "params_trainable": trainable,
                "gflop_per_image_fwd": flops / 1e9,
                # 3 x forward per image (forward + backward), every phase alike: an estimate
                # that ignores the weight gradients a frozen phase skips
                "train_tflop": 3 * flops * stage.batch_size * to_train / 1e12,
                "activation_bytes_per_image": act,
                "activation_bytes_per_image_no_checkpointing": act_full,
                "activation_checkpointing": spec.train.activation_checkpointing,
                "batch_size": stage.batch_size,
                "world_size": world_size,
                "per_rank_state_bytes": int(state),
                "per_rank_activation_bytes": int(act * per_rank_batch),
                "per_rank_total_bytes": int(state + act * per_rank_batch),
                "per_rank_transition_carried_bytes": carried,
                "per_rank_transition_added_bytes": added,
                "per_rank_transition_bytes": carried + added,
            })
            prev_trainable = trainable
    return rows


def total_train_tflop(rows: list[dict[str, Any]]) -> float:
    """Training compute of the whole schedule (TFLOP): the sum of the rows' ``train_tflop``."""
    return float(sum(r["train_tflop"] for r in rows))


def _h(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def _b(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {suffix}"
        n /= 1024
    return f"{n:.3g} PiB"


def print_plan(spec: RunSpec, rows: list[dict[str, Any]], world_size: int = 1, branch: str | None = None) -> None:
    """The rows as a table; ``branch`` names the checkpoint a ``--from`` run starts at."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan: {spec.name} (world size {world_size})")
    for col in ("stage", "res", "model", "phase", "steps", "params", "trainable", "GFLOP/img fwd",
                "train TFLOP", "act/img", "per-rank state", "per-rank act", "per-rank total"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["stage"]), str(r["resolution"]), str(r["topology"]), r["phase"],
            _h(r["steps"]) if r["steps_to_train"] == r["steps"] else f"{_h(r['steps_to_train'])} of {_h(r['steps'])}",
            _h(r["params_total"]), f"{_h(r['params_trainable'])} ({r['trainable_set']})",
            f"{r['gflop_per_image_fwd']:.3g}", f"{r['train_tflop']:.3g}", _b(r["activation_bytes_per_image"]),
            _b(r["per_rank_state_bytes"]), _b(r["per_rank_activation_bytes"]), _b(r["per_rank_total_bytes"]),
        )
    console = Console(width=200)
    console.print(table)
    if branch is not None:
        done = sum(r["steps"] - r["steps_to_train"] for r in rows)
        console.print(f"starting from {branch}: its {done} steps are not trained again ('N of M' steps: N left)")
    console.print(f"training compute: {total_train_tflop(rows):.4g} TFLOP")
    for r in rows:
        if r["phase"] == next(x["phase"] for x in rows if x["stage"] == r["stage"]):
            console.print(
                f"stage {r['stage']} build peak per rank: {_b(r['per_rank_transition_bytes'])} "
                f"(carried from the previous stage {_b(r['per_rank_transition_carried_bytes'])}, "
                f"new stage {_b(r['per_rank_transition_added_bytes'])})"
            )
    console.print(
        "GFLOP/img: one forward pass, measured with torch.utils.flop_counter (x3 for a training "
        "step; train TFLOP = 3 x fwd x batch x steps).  act/img: tensors saved for backward per image (with train.activation_checkpointing "
        "when the spec enables it: unit inputs + the largest unit's internals). per-rank "
        "state: fp32 params/FSDP + grads + AdamW for trainable params. build peak: the previous "
        "stage's sharded weights, EMA and AdamW state, the new stage's shards (+ EMA of new "
        "tensors), and the full values held for a moment: the new periphery and one block of a "
        "new core (the model is built on meta and sharded before it gets storage)."
    )
