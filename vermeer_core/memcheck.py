"""Memory checks from ``vermeer plan``'s estimate, before anything is built or written.

* :func:`check_sane` (``validate``, ``plan``, ``run``): a spec whose training state and
  activations, summed over all ranks, exceed :data:`MAX_TOTAL_BYTES` is refused as a spec error
  (a width of 2^20 asks for petabytes; no cluster vermeer targets has that). ``--no-size-check``
  overrides it.
* :func:`check_fits` (``run``): the per-rank peak against the memory this machine offers
  (``torch.cuda.mem_get_info`` per GPU; ``MemAvailable`` of ``/proc/meminfo`` shared by all
  CPU ranks), so a spec that cannot fit says what to do instead of dying in FSDP's init with an
  allocator traceback. ``--no-memory-check`` overrides it (the estimate is one, not a bound).
"""

from __future__ import annotations

from typing import Any

import torch

from vermeer_core.registry import Registry
from vermeer_core.spec import RunSpec, SpecError

__all__ = ["MAX_TOTAL_BYTES", "available_bytes", "check_fits", "check_sane", "peak_bytes"]

#: Largest training footprint (state + activations of the global batch, all ranks together)
#: a spec may ask for: 256 TiB, about 2000 of the largest accelerators sold today.
MAX_TOTAL_BYTES = 256 << 40


def _gib(n: float) -> str:
    return f"{n / (1 << 30):,.1f} GiB"


_PEAKS: dict[tuple[int, str], tuple[int, dict[str, Any]] | None] = {}


def peak_bytes(spec: RunSpec, registry: Registry, world_size: int) -> tuple[int, dict[str, Any]] | None:
    """The largest per-rank total of ``plan`` over all phases, with its row (at one rank); None
    when a component cannot be built on the meta device (then the run finds out itself).

    ``plan`` divides both the state and the batch by the world size, so the per-rank peak at
    ``n`` ranks is the one-rank peak over ``n``: the plan is computed once per spec."""
    from vermeer_core.plan import plan_rows
    from vermeer_core.spec import spec_hash

    key = (id(registry), spec_hash(spec))
    if key not in _PEAKS:
        try:
            rows = plan_rows(spec, registry, world_size=1)
        except (NotImplementedError, RuntimeError):
            rows = []
        worst = max(rows, key=lambda r: r["per_rank_total_bytes"], default=None)
        _PEAKS[key] = None if worst is None else (int(worst["per_rank_total_bytes"]), worst)
    found = _PEAKS[key]
    if found is None:
        return None
    return -(-found[0] // world_size), found[1]


def check_sane(spec: RunSpec, registry: Registry, source: str) -> None:
    """Refuse (:class:`SpecError`) a spec whose total training memory exceeds
    :data:`MAX_TOTAL_BYTES`."""
    found = peak_bytes(spec, registry, 1)
    if found is None or found[0] <= MAX_TOTAL_BYTES:
        return
    total, row = found
    raise SpecError(source, [("", (
        f"training stage {row['stage']} ({row['resolution']} px, phase {row['phase']!r}) needs about "
        f"{_gib(total)} of memory over all ranks ({row['params_total']:,} parameters, batch {row['batch_size']}), "
        f"more than the {_gib(MAX_TOTAL_BYTES)} vermeer accepts: check model.widths, the core's width/depth and "
        "stages.*.batch_size (see `vermeer plan`), or pass --no-size-check"
    ))])


def available_bytes(device: torch.device) -> tuple[int, str] | None:
    """(bytes one rank may use, where that number comes from), or None when unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return None


def check_fits(spec: RunSpec, registry: Registry, source: str, *, world_size: int, device: torch.device,
               available: tuple[int, str] | None = None) -> None:
    """Refuse (:class:`SpecError`, nothing written) when ``plan``'s per-rank peak at
    ``world_size`` ranks exceeds what ``device`` offers (``available`` overrides the probe)."""
    found = peak_bytes(spec, registry, world_size)
    have = available if available is not None else available_bytes(device)
    if found is None or have is None:
        return
    need, row = found
    ranks_here = world_size if device.type == "cpu" else 1  # CPU ranks share the host's memory
    if need * ranks_here <= have[0]:
        return
    advice = []
    if device.type == "cuda":
        fit = next((n for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if n > world_size
                    and (peak_bytes(spec, registry, n) or (0,))[0] <= have[0]), None)
        if fit is not None:
            advice.append(f"more ranks (about {fit}: --nproc-per-node, or several nodes with torchrun)")
        else:
            advice.append("more ranks (--nproc-per-node, or several nodes with torchrun)")
    if not spec.train.activation_checkpointing:
        advice.append("train.activation_checkpointing: true")
    advice += ["smaller stages.*.batch_size or model.widths", "--smoke to check the schedule end to end on tiny "
               "widths", "--no-memory-check to try anyway (the estimate is approximate)"]
    where = f"{world_size} CPU ranks share" if ranks_here > 1 else "one rank has"
    raise SpecError(source, [("", (
        f"this run needs about {_gib(need)} per rank (stage {row['stage']}, {row['resolution']} px, phase "
        f"{row['phase']!r}, batch {row['batch_size']} over {world_size} rank(s); see `vermeer plan --world-size "
        f"{world_size}`), but {where} {_gib(have[0])} ({have[1]}). Use: " + "; ".join(advice)
    ))])
