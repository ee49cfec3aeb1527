"""Test support for vermeer and its plugins: a pytest plugin (``pytest11`` entry point
``vermeer``), fixtures, and the *growth-policy contract* any policy can run against itself.

Fixtures (available in any pytest session where vermeer is installed):

* ``tiny_spec_data`` - a factory of tiny two-stage run specs (a grid-4 core grown 8 -> 16 px,
  a few CPU seconds): ``tiny_spec_data(growth={"type": "my-growth", ...})``;
* ``cpu_world`` - a world of one on the CPU (process group set up, torn down after);
* ``run_spec`` - run a spec in-process and get a :class:`RunResult` (run dir, metrics,
  checkpoints); ``stop_after=N`` stops it after global step N like a crash would.

The contract (:class:`GrowthPolicyContract`, or :func:`check_growth_policy` in one call)
proves, through real runs of a tiny spec, what the engine relies on:

1. the topology is a pure function of (spec, stage) (:func:`check_topology_is_pure`);
2. a run interrupted after a growth step and resumed equals an uninterrupted one bit for bit
   (:func:`check_resume_is_exact`);
3. parameters a phase freezes do not change (:func:`check_frozen_parameters_unchanged`);
4. a tensor the new stage reuses, or warm-starts by a transfer, starts from the trained
   source value (:func:`check_transfers_equal_sources`).

A plugin's test module subclasses the contract and names its growth config::

    from vermeer_core.testing import GrowthPolicyContract

    class TestMyGrowth(GrowthPolicyContract):
        growth = {"type": "my-growth", "phases": [{"name": "A", "steps": 2}]}

Heavy imports (torch, the engine) happen inside functions, so that merely having vermeer
installed does not slow down pytest's start in other projects.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from vermeer_core.hookspecs import hookimpl  # light: pluggy only

if TYPE_CHECKING:
    import torch

    from vermeer_core.plugins import Plugins
    from vermeer_core.spec import RunSpec

__all__ = [
    "TINY_SPEC",
    "GrowthPolicyContract",
    "RunResult",
    "check_frozen_parameters_unchanged",
    "check_growth_policy",
    "check_resume_is_exact",
    "check_topology_is_pure",
    "check_transfers_equal_sources",
    "committed_steps",
    "consolidate",
    "read_metrics",
    "run_spec",
    "tiny_spec_data",
]

#: A tiny two-stage run: a grid-4 core at 8 px grown to 16 px (stage 0 "core": 6 steps;
#: stage 1: phase A 2 steps with the core frozen, phase B 4 steps at half the lr).
TINY_SPEC: dict[str, Any] = {
    "name": "tiny-engine",
    "seed": 0,
    "model": {
        "grid": 4,
        "cond_dim": 16,
        "widths": {4: 8, 8: 8, 16: 8},
        "core": {"type": "shallow-uvit", "width": 16, "depth": 1, "heads": 2},
        "block": {"type": "resblock", "num_res_blocks": 1, "groups": 4},
        "text_encoder": {"type": "tiny", "dim": 16, "depth": 1, "heads": 2, "max_tokens": 32},
        "attention": {"type": "math"},
    },
    "data": {"type": "synthetic", "max_objects": 1},
    "sampling": {"sampler": {"type": "ddim"}, "steps": 2, "guidance": 2.0, "prompts": ["a large red circle"]},
    "optim": {"lr": 1.0e-3, "warmup_steps": 1, "decay": "constant", "grad_clip": 1.0},
    "ema": {"decay": 0.9},
    "train": {"log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 3, "max_bad_steps": 3},
    "stages": [
        {"resolution": 8, "batch_size": 4,
         "growth": {"type": "greedy", "phases": [{"name": "core", "steps": 6, "trainable": "all"}]}},
        {"resolution": 16, "batch_size": 4,
         "growth": {"type": "greedy", "phases": [
             {"name": "A", "steps": 2, "trainable": "new"},
             {"name": "B", "steps": 4, "trainable": "all", "lr_mult": 0.5},
         ]}},
    ],
}


def tiny_spec_data(
    growth: dict[str, Any] | Sequence[dict[str, Any]] | None = None, **train: Any
) -> dict[str, Any]:
    """A deep copy of :data:`TINY_SPEC`; ``growth`` replaces every stage's growth policy (one
    dict for all stages, or one per stage), ``train`` fields replace ``train``'s."""
    data = copy.deepcopy(TINY_SPEC)
    data["train"].update(train)
    if growth is not None:
        per_stage = [growth] * len(data["stages"]) if isinstance(growth, dict) else list(growth)
        if len(per_stage) != len(data["stages"]):
            raise ValueError(f"growth: give one dict or {len(data['stages'])} (one per stage)")
        for st, g in zip(data["stages"], per_stage):
            st["growth"] = copy.deepcopy(g)
    return data


# --- reading what a run wrote -----------------------------------------------------------------
def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of ``run``'s ``metrics.jsonl``, in order."""
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def committed_steps(run: str | Path) -> list[int]:
    """Steps of the checkpoints under ``run`` that carry a commit marker, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.exists():
        return []
    return sorted(int(d.name[5:]) for d in root.glob("step-*") if (d / "COMMITTED").exists())


def consolidate(checkpoint: str | Path, tmp: str | Path) -> dict[str, Any]:
    """All tensors of a DCP checkpoint as full (unsharded) tensors, read as torch's own
    converter (``dcp_to_torch_save``) reads them: an independent view of what was saved,
    whatever world size wrote it. Its ``.metadata`` goes through vermeer's restricted
    unpickler, not ``pickle.load``. (``tmp`` is kept for compatibility; nothing is written.)"""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from vermeer_core.trust import SafeReader

    state: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "no process group, assuming a single process"
        _load_state_dict(state, storage_reader=SafeReader(str(checkpoint)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    return state


# --- running ------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised from ``vermeer_step_end`` to stop a run after a given step, like a crash."""


@dataclass
class RunResult:
    """What an in-process run left behind."""

    run_dir: Path
    stopped_at: int | None = None  # the step a ``stop_after`` run stopped after

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir)

    @property
    def checkpoints(self) -> list[int]:
        """Committed checkpoint steps, oldest first."""
        return committed_steps(self.run_dir)

    def checkpoint(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / f"step-{step:08d}"


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full, detached CPU copy of a (possibly sharded) tensor."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().clone()


def run_spec(
    spec: dict[str, Any] | RunSpec,
    out: str | Path,
    *,
    plugins: Plugins | None = None,
    extra: Sequence[object] = (),
    stop_after: int | None = None,
    resume: str = "auto",
) -> RunResult:
    """Run ``spec`` (a mapping is validated first) in this process on a CPU world of one,
    writing to ``out``. ``plugins``: the loaded plugins (default: the process-wide ones);
    ``extra``: plugin objects registered for this run only (e.g. hook recorders), unregistered
    afterwards. ``stop_after=N`` stops after global step N (before that step's checkpoint), as
    a crash would; run again with the same ``out`` to resume."""
    from vermeer_core.distributed import init_distributed, shutdown
    from vermeer_core.engine import Engine
    from vermeer_core.plugins import get_plugins
    from vermeer_core.spec import parse_spec

    class Stopper:
        @hookimpl
        def vermeer_step_end(self, step: int) -> None:
            if step >= stop_after:  # type: ignore[operator]
                raise _Stop(step)

    plugins = plugins or get_plugins()
    if not hasattr(spec, "model_dump"):
        spec = parse_spec(dict(spec), plugins.registry, "<run_spec>")
    added = [*extra, *([Stopper()] if stop_after is not None else [])]
    for obj in added:
        plugins.manager.register(obj)
    d = init_distributed(device="cpu")
    result = RunResult(Path(out))
    try:
        Engine(spec, plugins, str(out), d, resume=resume).run()
    except _Stop as stop:
        result.stopped_at = stop.args[0]
    finally:
        shutdown()
        for obj in added:
            plugins.manager.unregister(obj)
    return result


# --- the growth-policy contract -----------------------------------------------------------------
def _spec(growth: dict[str, Any] | Sequence[dict[str, Any]], plugins: Plugins, **train: Any) -> RunSpec:
    from vermeer_core.spec import parse_spec

    return parse_spec(tiny_spec_data(growth, **train), plugins.registry, "<growth contract>")


def _stage_starts(spec: RunSpec, plugins: Plugins) -> list[int]:
    from vermeer_core.model import stage_phases

    starts, step = [], 0
    for stage in range(len(spec.stages)):
        starts.append(step)
        step += sum(p.steps for p in stage_phases(spec, plugins.registry, stage))
    return starts


def check_topology_is_pure(spec: RunSpec, plugins: Plugins) -> None:
    """Every stage grown twice from a replayed previous stage (with the global RNG disturbed in
    between) has the same structure, new modules, transfers and freshly initialised values,
    and :func:`~vermeer_core.model.replay` rebuilds the same structure."""
    import torch

    from vermeer_core.model import build_stage_model, replay

    reg = plugins.registry
    for stage in range(len(spec.stages)):
        builds = []
        for seed in (1, 2):
            torch.manual_seed(seed)  # the policy must not depend on the global generator
            prev = replay(spec, reg, stage - 1, device="cpu") if stage else None
            builds.append(build_stage_model(spec, reg, stage, prev))
        a, b = builds
        shapes = [{n: tuple(t.shape) for n, t in m.state_dict().items()} for m in (a, b)]
        assert shapes[0] == shapes[1], f"stage {stage}: two growths gave different tensors"
        assert a.topology() == b.topology(), f"stage {stage}: {a.topology()} != {b.topology()}"
        assert a.transfers.keys() == b.transfers.keys(), f"stage {stage}: transfers differ"
        new = [n for n, _ in a.named_parameters() if any(n == p or n.startswith(p + ".") for p in a.new_modules)]
        pb = dict(b.named_parameters())
        differ = [n for n, p in a.named_parameters() if n in new and not torch.equal(p, pb[n])]
        assert not differ, f"stage {stage}: new parameters initialised differently: {differ[:5]}"
        replayed = replay(spec, reg, stage, device="meta")
        assert {n: tuple(t.shape) for n, t in replayed.state_dict().items()} == shapes[0], (
            f"stage {stage}: replay() rebuilds another structure than growing step by step"
        )


class _Probe:
    """A plugin recording, through the lifecycle hooks, what the contract checks in a run."""

    def __init__(self) -> None:
        self.frozen: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.changed: list[str] = []
        self.stage_start: dict[int, tuple[dict[str, torch.Tensor], frozenset[str], dict[str, Any]]] = {}

    @hookimpl
    def vermeer_phase_start(self, stage: int, phase: Any, phase_step: int, model: Any, step: int) -> None:
        self.frozen[(stage, phase.name)] = {n: _full(p) for n, p in model.named_parameters() if not p.requires_grad}
        if stage not in self.stage_start and phase_step == 0:
            values = {n: _full(t) for n, t in model.state_dict().items()}
            self.stage_start[stage] = (values, frozenset(model.new_modules), dict(model.transfers))

    @hookimpl
    def vermeer_step_end(self, stage: int, phase: Any, phase_step: int, model: Any) -> None:
        import torch

        if phase_step != phase.steps:
            return
        params = dict(model.named_parameters())
        for n, before in self.frozen[(stage, phase.name)].items():
            if not torch.equal(before, _full(params[n])):
                self.changed.append(f"stage {stage} phase {phase.name}: {n}")


def _contract_run(spec: RunSpec, plugins: Plugins, out: Path) -> tuple[RunResult, _Probe]:
    probe = _Probe()
    return run_spec(spec, out, plugins=plugins, extra=[probe]), probe


def check_frozen_parameters_unchanged(probe: _Probe) -> None:
    """No parameter that a phase froze changed during that phase."""
    assert probe.frozen, "no phase started: was the run empty?"
    assert not probe.changed, f"frozen parameters changed: {probe.changed[:5]}"


def check_transfers_equal_sources(
    result: RunResult, probe: _Probe, spec: RunSpec, plugins: Plugins, tmp: Path
) -> int:
    """At the start of every stage after the first, each tensor the stage reuses (same name,
    not new) equals the trained tensor of the previous stage's final checkpoint, and each
    transfer target equals its sources (copied, or ``fn`` applied to them). Returns how many
    tensors were compared."""
    import torch

    from vermeer_core.transfer import resolve_transfers

    starts = _stage_starts(spec, plugins)
    checked = 0
    for stage in range(1, len(spec.stages)):
        assert stage in probe.stage_start, f"stage {stage} never started"
        values, new_modules, transfers = probe.stage_start[stage]
        trained = consolidate(result.checkpoint(starts[stage]), tmp)["model"]
        plan = resolve_transfers(
            transfers, {n: t.shape for n, t in values.items()}, {n: t.shape for n, t in trained.items()},
            where=f"stage {stage}",
        )
        wrong = []
        for name, value in values.items():
            if name in plan:
                t = plan[name]
                sources = [trained[s] for s in t.sources]
                expected = sources[0] if t.fn is None else t.fn(*sources)
            elif not any(name == p or name.startswith(p + ".") for p in new_modules) and name in trained:
                expected = trained[name]
            else:
                continue
            checked += 1
            if not torch.equal(value, expected.to(value.dtype)):
                wrong.append(name)
        assert not wrong, f"stage {stage}: tensors that do not start from their trained source: {wrong[:5]}"
    return checked


def check_resume_is_exact(reference: RunResult, spec: RunSpec, plugins: Plugins, tmp: Path) -> None:
    """A run stopped one step after the first growth (so it resumes from the stage-boundary
    checkpoint, replaying growth and transfers) and resumed ends with the reference run's
    losses and final model, EMA and optimizer state, bit for bit."""
    import torch

    starts = _stage_starts(spec, plugins)
    if len(starts) < 2:
        raise ValueError("the resume contract needs a spec with at least two stages")
    out = tmp / "interrupted"
    first = run_spec(spec, out, plugins=plugins, stop_after=starts[1] + 1)
    assert first.stopped_at == starts[1] + 1, "the interrupted run did not reach the second stage"
    run_spec(spec, out, plugins=plugins)
    ref, got = reference.metrics, read_metrics(out)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    mismatched = [(a["step"], a["loss"], b["loss"]) for a, b in zip(got, ref) if a["loss"] != b["loss"]]
    assert not mismatched, f"resumed losses differ from the uninterrupted run's: {mismatched[:5]}"
    last = reference.checkpoints[-1]
    a = consolidate(reference.checkpoint(last), tmp)
    b = consolidate(out / "checkpoints" / f"step-{last:08d}", tmp / "interrupted")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys(), part
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, f"{part} differs after resume: {differ[:5]}"
    assert a["optim"].keys() == b["optim"].keys()
    differ = [k for k, s in a["optim"].items() if not all(torch.equal(s[x], b["optim"][k][x]) for x in s)]
    assert not differ, f"optimizer state differs after resume: {differ[:5]}"


def check_growth_policy(
    growth: dict[str, Any] | Sequence[dict[str, Any]], tmp: str | Path, *, plugins: Plugins | None = None
) -> None:
    """Run the whole contract on the tiny spec with ``growth`` at every stage (or one config
    per stage); give small phases (a few steps each). Raises AssertionError naming the
    broken property."""
    from vermeer_core.plugins import get_plugins

    plugins = plugins or get_plugins()
    tmp = Path(tmp)
    spec = _spec(growth, plugins, checkpoint_every=10_000)
    check_topology_is_pure(spec, plugins)
    result, probe = _contract_run(spec, plugins, tmp / "reference")
    check_frozen_parameters_unchanged(probe)
    check_transfers_equal_sources(result, probe, spec, plugins, tmp)
    check_resume_is_exact(result, spec, plugins, tmp)


class GrowthPolicyContract:
    """Subclass in a test module and set :attr:`growth` (and :attr:`plugins_extra` for plugin
    objects that are not installed entry points) to run the growth-policy contract against a
    policy; each property is its own test. One uninterrupted run is shared by the class."""

    #: the policy's config for every stage (a dict) or one per stage (a list of two)
    growth: dict[str, Any] | Sequence[dict[str, Any]] = {}
    #: plugin objects to register besides the installed ones (e.g. a module under test)
    plugins_extra: Sequence[object] = ()

    @pytest.fixture(scope="class")
    @classmethod
    def contract(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
        from vermeer_core.plugins import get_plugins, load

        if not cls.growth:
            pytest.fail(f"{cls.__name__}.growth is not set: give the growth policy's config")
        plugins = load(extra=list(cls.plugins_extra)) if cls.plugins_extra else get_plugins()
        tmp = tmp_path_factory.mktemp("contract")
        spec = _spec(cls.growth, plugins, checkpoint_every=10_000)
        state: dict[str, Any] = {"plugins": plugins, "spec": spec, "tmp": tmp}

        def reference() -> tuple[RunResult, _Probe]:
            if "run" not in state:
                state["run"] = _contract_run(spec, plugins, tmp / "reference")
            return state["run"]

        state["reference"] = reference
        yield state

    def test_topology_is_a_pure_function_of_spec_and_stage(self, contract: dict[str, Any]) -> None:
        check_topology_is_pure(contract["spec"], contract["plugins"])

    def test_frozen_parameters_do_not_change(self, contract: dict[str, Any]) -> None:
        check_frozen_parameters_unchanged(contract["reference"]()[1])

    def test_reused_and_transferred_tensors_equal_their_sources(self, contract: dict[str, Any]) -> None:
        result, probe = contract["reference"]()
        check_transfers_equal_sources(result, probe, contract["spec"], contract["plugins"], contract["tmp"])

    def test_resume_across_a_growth_step_is_bit_exact(self, contract: dict[str, Any]) -> None:
        result, _ = contract["reference"]()
        check_resume_is_exact(result, contract["spec"], contract["plugins"], contract["tmp"])


# --- pytest fixtures (the pytest11 plugin) --------------------------------------------------------
@pytest.fixture(name="tiny_spec_data")
def _tiny_spec_data_fixture() -> Callable[..., dict[str, Any]]:
    """Factory of tiny two-stage spec mappings: ``tiny_spec_data(growth=..., **train)``."""
    return tiny_spec_data


@pytest.fixture
def cpu_world() -> Iterator[Any]:
    """A CPU world of one (``DistInfo``); the process group is destroyed afterwards."""
    from vermeer_core.distributed import init_distributed, shutdown

    d = init_distributed(device="cpu")
    try:
        yield d
    finally:
        shutdown()


@pytest.fixture(name="run_spec")
def _run_spec_fixture(tmp_path: Path) -> Callable[..., RunResult]:
    """``run_spec(spec, out=None, **kw) -> RunResult``: :func:`run_spec` writing under
    ``tmp_path`` unless ``out`` is given."""

    def run(spec: Any, out: str | Path | None = None, **kw: Any) -> RunResult:
        return run_spec(spec, out if out is not None else tmp_path / "run", **kw)

    return run
