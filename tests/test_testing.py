"""vermeer_core.testing: its fixtures (through the pytest11 entry point) and the growth-policy
contract, run against the built-in policies and shown to catch a broken one."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest
import torch

from vermeer_core.api import ComponentConfig, GrowthContext, Phase, VermeerModel, hookimpl
from vermeer_core.plugins import load
from vermeer_core.testing import (
    GrowthPolicyContract,
    RunResult,
    check_frozen_parameters_unchanged,
    check_topology_is_pure,
    check_transfers_equal_sources,
    committed_steps,
    tiny_spec_data,
)
from vermeer_core.spec import parse_spec

PHASES = [{"name": "A", "steps": 2, "trainable": "new"}, {"name": "B", "steps": 2, "trainable": "all"}]


class TestGreedyContract(GrowthPolicyContract):
    growth = {"type": "greedy", "phases": PHASES}

    def test_the_source_check_compares_the_kept_core(self, contract) -> None:
        """Not vacuous: greedy keeps text, cond and core, so their tensors are compared."""
        result, probe = contract["reference"]()
        values, new, _ = probe.stage_start[1]
        assert not any(n.startswith("core.") for n in new)
        n = check_transfers_equal_sources(result, probe, contract["spec"], contract["plugins"], contract["tmp"])
        assert n >= sum(1 for k in values if k.startswith(("core.", "text.", "cond."))) > 0
        # ...and a tampered start value is caught
        name = next(k for k in values if k.startswith("core."))
        original = values[name]
        values[name] = original + 1
        try:
            with pytest.raises(AssertionError, match=f"stage 1: tensors that do not start.*{name}"):
                check_transfers_equal_sources(result, probe, contract["spec"], contract["plugins"], contract["tmp"])
        finally:
            values[name] = original

    def test_the_frozen_check_catches_a_change(self, contract) -> None:
        _, probe = contract["reference"]()
        assert any(k[1] == "A" and any(n.startswith("core.") for n in v) for k, v in probe.frozen.items())
        broken = type(probe)()
        broken.frozen, broken.changed = probe.frozen, ["stage 1 phase A: core.x"]
        with pytest.raises(AssertionError, match="frozen parameters changed"):
            check_frozen_parameters_unchanged(broken)


class TestFromScratchContract(GrowthPolicyContract):
    growth = {"type": "from-scratch", "phases": PHASES[1:]}


def test_pytest_plugin_is_registered_by_entry_point(pytestconfig: pytest.Config) -> None:
    eps = {e.name: e.value for e in md.entry_points(group="pytest11")}
    assert eps.get("vermeer") == "vermeer_core.testing"
    assert pytestconfig.pluginmanager.has_plugin("vermeer")


def test_fixtures_run_a_tiny_spec_and_stop_like_a_crash(tiny_spec_data, run_spec, tmp_path: Path) -> None:
    data = tiny_spec_data({"type": "greedy", "phases": [{"name": "A", "steps": 2}]}, checkpoint_every=1)
    result = run_spec(data, stop_after=3)
    assert isinstance(result, RunResult) and result.stopped_at == 3
    # step 3 ran and was logged, but a crash at its end leaves its checkpoint unwritten
    assert [r["step"] for r in result.metrics] == [1, 2, 3]
    assert result.checkpoints == [1, 2]
    resumed = run_spec(data)
    assert resumed.stopped_at is None and [r["step"] for r in resumed.metrics] == [1, 2, 3, 4]
    assert committed_steps(resumed.run_dir)[-1] == 4


def test_cpu_world_fixture(cpu_world) -> None:
    import torch.distributed as dist

    assert dist.is_initialized() and cpu_world.world_size == 1 and cpu_world.device.type == "cpu"


class _GlobalRNGConfig(ComponentConfig):
    pass


class GlobalRNGGrowth:
    """A broken policy: its stage-1 init depends on the global generator, not (spec, stage)."""

    def __init__(self, config: _GlobalRNGConfig) -> None:
        self.config = config

    def grow(self, prev: VermeerModel | None, ctx: GrowthContext) -> VermeerModel:
        if prev is None:
            return ctx.builder.unet(ctx.resolution)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.seed()) % 2**31)  # fresh entropy: not a function of the spec
            model = ctx.builder.unet(ctx.resolution, reuse=prev)
        return model

    def phases(self, ctx: GrowthContext) -> list[Phase]:
        return [Phase("all", 2)]


class _BrokenPlugin:
    @hookimpl
    def vermeer_register(self, registry) -> None:
        registry.add("growth_policy", "global-rng", GlobalRNGGrowth, _GlobalRNGConfig)


def test_contract_catches_a_policy_that_is_not_a_function_of_the_spec() -> None:
    plugins = load(extra=[_BrokenPlugin()])
    spec = parse_spec(tiny_spec_data({"type": "global-rng"}), plugins.registry)
    with pytest.raises(AssertionError, match="stage 1: new parameters initialised differently"):
        check_topology_is_pure(spec, plugins)
    good = parse_spec(tiny_spec_data({"type": "from-scratch", "phases": PHASES[1:]}), plugins.registry)
    check_topology_is_pure(good, plugins)
