"""Training-step throughput of real models: images/s, achieved TFLOP/s and MFU.

A step is what the engine does per batch, minus logging and checkpoints: the real
``diffusion_loss`` on a ``VermeerModel`` grown through the registry, backward, AdamW (built by
``vermeer_core.optim.build_optimizer`` over the phase's trainable parameters), zero_grad.

* ``test_stage_step``: the quickstart spec's stages (32, 64, 128) and one more at 256. Baseline in
  the same run: fp32 training of the stage's last phase (all parameters); variants: bf16
  autocast, and each earlier greedy phase (phase A: core frozen) in fp32.
* ``test_paper_core_mfu`` (CUDA only): a paper-shaped core (width 1024/2048, depth 8, D=128)
  pretrained as a Shallow-UViT at 64x64, in bf16: eager autocast (baseline), with the engine's
  per-example random generators, with fused AdamW, and through the engine's FSDP2 bf16 path at
  world size 1; ``test_paper_core_compiled`` (``--bench-compile``): the largest one through the
  engine's path compiled per block, as ``train.compile`` does.

FLOPs per image: one forward measured by ``torch.utils.flop_counter`` on a meta copy
(``vermeer_core.plan.stage_forward_flops``), times 3 for forward+backward, also for phase A whose
backward skips the frozen core's weight gradients (so its TFLOP/s overstates the work done).
MFU only where ``vermeer_core.metrics.peak_flops`` knows the device's bf16 peak.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from benchlib import Timing, compare
from stepcase import EXTRA_RESOLUTION, quickstart_spec
from vermeer_core.diffusion import diffusion_loss
from vermeer_core.interfaces import Phase
from vermeer_core.metrics import peak_flops
from vermeer_core.model import VermeerModel, apply_phase, build_stage_model, stage_phases
from vermeer_core.optim import build_optimizer
from vermeer_core.plan import stage_forward_flops
from vermeer_core.plugins import get_registry
from vermeer_core.spec import RunSpec, parse_spec

# Per-step batch: a few seconds per case on a 2-core CPU; enough work per step to fill a GPU.
BATCH = {"cpu": {32: 8, 64: 4, 128: 2, 256: 1}, "cuda": {32: 256, 64: 128, 128: 64, 256: 32}}
# (core width, depth, batch at 64x64): heads of 128 channels, as large cores use
PAPER_CORES = [(1024, 8, 64), (2048, 8, 32)]


def paper_core_spec(width: int, depth: int) -> RunSpec:
    """Core pretraining at 64x64 on the 16x16 grid with a paper-sized transformer core."""
    data = {
        "name": f"paper-core-w{width}-d{depth}",
        "model": {
            "grid": 16,
            "cond_dim": 1024,
            "widths": {16: 256, 32: 256, 64: 128},
            "core": {"type": "shallow-uvit", "width": width, "depth": depth, "heads": width // 128},
            "block": {"type": "resblock", "num_res_blocks": 1},
            "text_encoder": {"type": "tiny", "dim": 512, "depth": 2, "heads": 8, "max_tokens": 64},
            "attention": {"type": "auto"},
        },
        "stages": [{"resolution": 64, "batch_size": 64, "growth": {"type": "greedy", "phases": [{"name": "core", "steps": 1}]}}],
    }
    return parse_spec(data, get_registry(), data["name"])


def make_step(
    model: nn.Module, phase: Phase, spec: RunSpec, stage: int, device: torch.device, batch_size: int, *,
    autocast_bf16: bool, per_example_rng: bool = False, fused_adamw: bool = False,
) -> Callable[[], None]:
    """One training step of ``model`` (already on ``device``) in ``phase`` on a fixed batch.
    AdamW in torch's default (foreach) implementation unless ``fused_adamw`` (what the engine
    picks where the kernel exists: ``build_optimizer(fused=None)``)."""
    reg = get_registry()
    resolution = spec.stages[stage].resolution
    names = apply_phase(model, phase)  # type: ignore[arg-type]
    o = spec.optim
    opt = build_optimizer(model, names, {}, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                          fused=fused_adamw)
    schedule = reg.build(spec.diffusion.schedule, "noise_schedule")
    data = reg.build(spec.data, "dataset", resolution=resolution, batch_size=batch_size, rank=0, world_size=1, seed=0)
    batch = next(iter(data))
    images, captions = batch.images.to(device), batch.captions
    shared = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        # The engine draws each example's noise from its own freshly seeded generator
        # (world-size-independent randomness); the plain variant shares one.
        gen: Any = [torch.Generator(device=device).manual_seed(i) for i in range(batch_size)] if per_example_rng else shared
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = diffusion_loss(
                model, images, captions, schedule=schedule, resolution=resolution,
                prediction=spec.diffusion.prediction, cond_drop=spec.diffusion.cond_drop, generator=gen,
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def throughput(timing: Timing, batch_size: int, fwd_flops: int, peak: float | None) -> dict[str, Any]:
    """images/s, achieved TFLOP/s (3x forward FLOPs per image) and MFU for a step timing."""
    ips = batch_size / (timing.median_ms / 1e3)
    achieved = 3 * fwd_flops * ips
    return {"images_per_s": ips, "tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
            "peak_tflops": peak / 1e12 if peak else None}


@pytest.fixture(scope="module")
def quick() -> tuple[RunSpec, list[VermeerModel]]:
    """The spec and each stage's model, grown stage by stage on the CPU (shared core modules)."""
    spec = quickstart_spec()
    reg = get_registry()
    models: list[VermeerModel] = []
    for k in range(len(spec.stages)):
        models.append(build_stage_model(spec, reg, k, prev=models[-1] if models else None))
    return spec, models


@pytest.mark.parametrize("resolution", [32, 64, 128, EXTRA_RESOLUTION], ids=lambda r: f"r{r}")
def test_stage_step(resolution: int, device: torch.device, bench: Any, quick: tuple[RunSpec, list[VermeerModel]],
                    matmul_peak: dict[str, float]) -> None:
    spec, models = quick
    stage = [s.resolution for s in spec.stages].index(resolution)
    reg = get_registry()
    phases = stage_phases(spec, reg, stage)
    batch = BATCH[device.type][resolution]
    fwd_flops = stage_forward_flops(spec, reg, stage)
    last = phases[-1]
    # (name, phase, bf16 autocast); the first is the baseline
    variants = [(f"fp32/{last.name}({last.trainable})", last, False), (f"bf16/{last.name}({last.trainable})", last, True)]
    variants += [(f"fp32/{p.name}({p.trainable})", p, False) for p in phases[:-1]]
    steps: dict[str, Callable[[], None]] = {}
    trainable: dict[str, int] = {}
    for name, phase, bf16 in variants:
        # a private copy per variant: phases set requires_grad, optimizers hold state
        model = copy.deepcopy(models[stage]).to(device)
        steps[name] = make_step(model, phase, spec, stage, device, batch, autocast_bf16=bf16)
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cpu = device.type == "cpu"
    timings, errors = compare(steps, device, warmup=1 if cpu else 3, repeats=5 if cpu else 10,
                              min_block_ms=0.0 if cpu else 100.0)
    group = f"train/{device.type}/quickstart-r{resolution}"
    for i, (name, _, bf16) in enumerate(variants):
        if name in errors:
            bench.record(group, name, baseline=i == 0, error=errors[name])
            continue
        peak = peak_flops(device, bf16)
        measured = throughput(timings[name], batch, fwd_flops, peak)
        ref = matmul_peak.get("bf16" if bf16 else "fp32")  # this run's measured matmul peak
        of_peak = measured["tflops"] * 1e12 / ref if ref else None
        bench.record(
            group, name, baseline=i == 0, device=device.type, resolution=resolution, batch=batch,
            precision="bf16-autocast" if bf16 else "fp32", params_trainable=trainable[name],
            gflop_per_image_fwd=fwd_flops / 1e9, **timings[name].as_dict(), **measured, of_peak=of_peak,
        )
    assert not errors, f"training steps failed: {errors}"


@pytest.fixture(scope="module")
def world_of_one() -> Iterator[Any]:
    """The engine's process group and mesh at world size 1 (in-process store, no network)."""
    from vermeer_core.distributed import init_distributed, shutdown

    info = init_distributed(device="cuda" if torch.cuda.is_available() else "cpu")
    yield info
    shutdown()


def _build_on(spec: RunSpec, device: torch.device) -> VermeerModel:
    """Stage 0 of ``spec``, initialised directly on ``device`` (a 700M-parameter init on the
    host would take longer than the benchmark)."""
    with torch.device(device):
        return build_stage_model(spec, get_registry(), 0)


def _max_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def stage_params(spec: RunSpec) -> int:
    """Parameters of stage 0 of ``spec`` (counted on the meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_stage_model(spec, get_registry(), 0).parameters())


def core_pretraining_case(
    spec: RunSpec, batch: int, device: torch.device, bench: Any, mesh: Any, *, eager: bool = True,
    compiled: bool = False,
) -> dict[str, str]:
    """Time stage 0 of ``spec`` in bf16: the ``eager`` variants (autocast baseline, per-example
    RNG, fused AdamW, the engine's path) and/or the engine's path ``compiled``; returns the
    variants that failed. The engine's path is what ``vermeer run`` does on this device: FSDP2
    bf16 parameters on CUDA, fp32 parameters under bf16 autocast on CPU."""
    from vermeer_core.distributed import parallelize

    reg = get_registry()
    phase = stage_phases(spec, reg, 0)[-1]
    fwd_flops = stage_forward_flops(spec, reg, 0)
    peak = peak_flops(device, True)
    group = f"train/{device.type}/{spec.name}-r{spec.stages[0].resolution}"
    common: dict[str, Any] = {"device": device.type, "resolution": spec.stages[0].resolution, "batch": batch,
                              "gflop_per_image_fwd": fwd_flops / 1e9, "params": stage_params(spec)}
    failures: dict[str, str] = {}
    cpu = device.type == "cpu"

    def measure(variants: dict[str, Callable[[], None]], baseline: str | None = None) -> None:
        timings, errors = compare(variants, device, warmup=1 if cpu else 3, repeats=2 if cpu else 10,
                                  min_block_ms=0.0 if cpu else 200.0)
        failures.update(errors)
        mem = _max_memory_gib(device)
        for name in variants:
            if name in errors:
                bench.record(group, name, baseline=name == baseline, error=errors[name])
            else:
                bench.record(group, name, baseline=name == baseline, mem_gib=mem, **common,
                             **timings[name].as_dict(), **throughput(timings[name], batch, fwd_flops, peak))

    engine_variants: list[tuple[str, bool]] = []
    if eager:
        # One model at a time: a 700M-parameter model with its AdamW states is over 10 GiB.
        _reset_memory(device)
        model = _build_on(spec, device)
        measure({
            "bf16-autocast": make_step(model, phase, spec, 0, device, batch, autocast_bf16=True),
            "bf16-autocast+per-example-rng": make_step(model, phase, spec, 0, device, batch, autocast_bf16=True,
                                                       per_example_rng=True),
            "bf16-autocast+fused-adamw": make_step(model, phase, spec, 0, device, batch, autocast_bf16=True,
                                                   fused_adamw=True),
        }, baseline="bf16-autocast")
        del model
        engine_variants.append(("fsdp2-bf16+per-example-rng (engine)", False))
    if compiled:
        engine_variants.append(("fsdp2-bf16+compile+per-example-rng (engine)", True))
    for name, compile_units in engine_variants:
        _reset_memory(device)
        try:
            model = parallelize(_build_on(spec, device), mesh, bf16=not cpu, compile=compile_units)
            step = make_step(model, phase, spec, 0, device, batch, autocast_bf16=cpu, per_example_rng=True)
        except Exception as exc:  # noqa: BLE001 - recorded, and fails the case
            failures[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            bench.record(group, name, error=failures[name])
            continue
        measure({name: step})
        del model, step
    return failures


@pytest.mark.parametrize(("width", "depth", "batch"), PAPER_CORES, ids=[f"w{w}-d{d}-b{b}" for w, d, b in PAPER_CORES])
def test_paper_core_mfu(
    width: int, depth: int, batch: int, device: torch.device, bench: Any, request: pytest.FixtureRequest
) -> None:
    if device.type != "cuda":
        pytest.skip("paper-shaped cores are timed on CUDA only (hundreds of GFLOP per image)")
    mesh = request.getfixturevalue("world_of_one").mesh
    failures = core_pretraining_case(paper_core_spec(width, depth), batch, device, bench, mesh)
    assert not failures, f"training steps failed: {failures}"


def test_paper_core_compiled(device: torch.device, bench: Any, request: pytest.FixtureRequest, compile_enabled: bool) -> None:
    """The largest paper core through the engine's path with ``train.compile``. Runs last:
    compiling takes a while, and everything else is saved if a time limit stops it."""
    if device.type != "cuda" or not compile_enabled:
        pytest.skip("compiled training is timed on CUDA with --bench-compile only")
    width, depth, batch = PAPER_CORES[-1]
    mesh = request.getfixturevalue("world_of_one").mesh
    failures = core_pretraining_case(paper_core_spec(width, depth), batch, device, bench, mesh, eager=False, compiled=True)
    assert not failures, f"training steps failed: {failures}"
