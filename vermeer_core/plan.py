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

from vermeer_core.distributed import sharded_units
from vermeer_core.model import VermeerModel, build_stage_model, select_trainable
from vermeer_core.phases import describe_trainable
from vermeer_core.registry import Registry
from vermeer_core.schedule_table import step_table
from vermeer_core.spec import RunSpec

__all__ = ["measure_forward", "plan_rows", "print_plan", "stage_forward_flops", "total_train_tflop"]

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


def plan_rows(spec: RunSpec, registry: Registry, world_size: int = 1) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    slots = step_table(spec, registry)
    model: VermeerModel | None = None
    for k, stage in enumerate(spec.stages):
        with torch.device("meta"):
            model = build_stage_model(spec, registry, k, prev=model)
        flops, act_full, act_ckpt = measure_forward(model, stage.resolution)
        act = act_ckpt if spec.train.activation_checkpointing else act_full
        total = sum(p.numel() for p in model.parameters())
        per_rank_batch = stage.batch_size / world_size
        for slot in (s for s in slots if s.stage == k):
            trainable_names = select_trainable(model, slot.phase.trainable)
            trainable = sum(p.numel() for n, p in model.named_parameters() if n in trainable_names)
            # fp32 parameters (4 B) for all; fp32 gradient (4 B) + AdamW moments (8 B) for trainable
            state = (4 * total + 12 * trainable) / world_size
            rows.append({
                "stage": k,
                "resolution": stage.resolution,
                "topology": model.topology().get("kind"),
                "phase": slot.phase.name,
                "steps": slot.phase.steps,
                "trainable_set": describe_trainable(slot.phase.trainable),
                "params_total": total,
                "params_trainable": trainable,
                "gflop_per_image_fwd": flops / 1e9,
                # 3 x forward per image (forward + backward), every phase alike: an estimate
                # that ignores the weight gradients a frozen phase skips
                "train_tflop": 3 * flops * stage.batch_size * slot.phase.steps / 1e12,
                "activation_bytes_per_image": act,
                "activation_bytes_per_image_no_checkpointing": act_full,
                "activation_checkpointing": spec.train.activation_checkpointing,
                "batch_size": stage.batch_size,
                "world_size": world_size,
                "per_rank_state_bytes": int(state),
                "per_rank_activation_bytes": int(act * per_rank_batch),
                "per_rank_total_bytes": int(state + act * per_rank_batch),
            })
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


def print_plan(spec: RunSpec, rows: list[dict[str, Any]], world_size: int = 1) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan: {spec.name} (world size {world_size})")
    for col in ("stage", "res", "model", "phase", "steps", "params", "trainable", "GFLOP/img fwd",
                "train TFLOP", "act/img", "per-rank state", "per-rank act", "per-rank total"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["stage"]), str(r["resolution"]), str(r["topology"]), r["phase"], _h(r["steps"]),
            _h(r["params_total"]), f"{_h(r['params_trainable'])} ({r['trainable_set']})",
            f"{r['gflop_per_image_fwd']:.3g}", f"{r['train_tflop']:.3g}", _b(r["activation_bytes_per_image"]),
            _b(r["per_rank_state_bytes"]), _b(r["per_rank_activation_bytes"]), _b(r["per_rank_total_bytes"]),
        )
    console = Console(width=200)
    console.print(table)
    console.print(f"training compute: {total_train_tflop(rows):.4g} TFLOP")
    console.print(
        "GFLOP/img: one forward pass, measured with torch.utils.flop_counter (x3 for a training "
        "step; train TFLOP = 3 x fwd x batch x steps).  act/img: tensors saved for backward per image (with train.activation_checkpointing "
        "when the spec enables it: unit inputs + the largest unit's internals). per-rank "
        "state: fp32 params/FSDP + grads + AdamW for trainable params."
    )
