"""Transfers: a growth policy warm-starts new tensors from the previous stage's TRAINED tensors
(renamed, moved to another depth, from a discarded module, or through a function), and the
engine carries their EMA and AdamW state with them; resume stays exact with transfers in play;
a wrong transfer fails before training (and in ``vermeer validate``) naming both tensors."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from engine_spec import ROOT, STAGE0_END, TOTAL_STEPS, consolidate, read_metrics, run_cli
from torch.distributed.tensor import DTensor
from warm_policy import WarmConfig, WarmPlugin, WarmStart, warm_data

from vermeer_core import cli
from vermeer_core.api import GrowthContext, Registry, Transfer, TransferError, VermeerModel, hookimpl
from vermeer_core.distributed import init_distributed, shutdown
from vermeer_core.engine import Engine, RunError
from vermeer_core.model import build_stage_model, replay, stage_transfers
from vermeer_core.plugins import Plugins, load
from vermeer_core.spec import RunSpec, parse_spec

@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return load(extra=[WarmPlugin()])


class Probe(Engine):
    """The engine, recording the stage-1 state right after the model was built, sharded,
    loaded and transferred (before its first step): weights, EMA (with ages), AdamW state."""

    probe: dict[str, Any]

    def _stage_model(self, stage: int, carry: Any, **kw: Any) -> Any:
        model, ema = super()._stage_model(stage, carry, **kw)
        if stage == 1 and carry is not None:
            full = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731
            self.probe = {
                "model": {k: full(v) for k, v in model.state_dict().items()},
                "ema": {k: full(v) for k, v in ema.shadow.items()},
                "age": dict(ema.age),
                "optim": {k: {s: full(t) for s, t in st.items()} for k, st in carry.optim.items()},
            }
        return model, ema


def run(spec: RunSpec, plugins: Plugins, out: Path, engine: type[Engine] = Engine) -> Engine:
    d = init_distributed(device="cpu")
    try:
        e = engine(spec, plugins, str(out), d)
        e.run()
    finally:
        shutdown()
    return e


@pytest.fixture(scope="module")
def warm_run(plugins: Plugins, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Probe]:
    """One uninterrupted run of the warm-start policy, a checkpoint every 2 steps (all kept)."""
    spec = parse_spec(warm_data(checkpoint_every=2, keep_checkpoints=10), plugins.registry)
    out = tmp_path_factory.mktemp("warm") / "run"
    engine = run(spec, plugins, out, Probe)
    return out, engine  # type: ignore[return-value]


def expected_pairs() -> dict[str, str]:
    """Every (target tensor -> source tensor) the string transfers resolve to."""
    spec = parse_spec(warm_data(), load(extra=[WarmPlugin()]).registry)
    reg = load(extra=[WarmPlugin()]).registry
    with torch.device("meta"):
        m0 = build_stage_model(spec, reg, 0)
        m1 = build_stage_model(spec, reg, 1, prev=m0)
    return {k: t.sources[0] for k, t in stage_transfers(m1, m0, 1).items() if t.fn is None}


def test_transferred_tensors_equal_their_trained_sources(warm_run: tuple[Path, Probe], tmp_path: Path) -> None:
    out, engine = warm_run
    got = engine.probe
    src = consolidate(out / "checkpoints" / f"step-{STAGE0_END:08d}", tmp_path)  # stage 0, trained
    pairs = expected_pairs()
    # prefixes expanded, the more specific key won, the discarded periphery is a source
    assert pairs["core.blocks.1.attn.qkv.weight"] == "core.blocks.0.attn.qkv.weight"
    assert pairs["core.blocks.0.attn.qkv.weight"] == "core.blocks.0.attn.qkv.weight"
    assert pairs["decoders.r8.blocks.0.conv1.weight"] == "shallow_out.conv1.weight"
    assert len(pairs) > 50
    for new, old in pairs.items():
        assert torch.equal(got["model"][new], src["model"][old]), new
        if new in got["ema"]:
            assert torch.equal(got["ema"][new], src["ema"][old]), new
            assert got["age"][new] == STAGE0_END, new  # the average's age travels with it
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got["optim"][new][key], src["optim"][old][key]), (new, key)
    # functions of the trained tensors: weights and EMA through fn; moments only if asked
    bias, w = "head.proj.bias", "encoders.r8.blocks.0.conv1.weight"
    assert torch.equal(got["model"][bias], src["model"][bias][:3] * 0.5)
    assert torch.equal(got["ema"][bias], src["ema"][bias][:3] * 0.5)
    assert bias not in got["optim"]  # a mix: fresh moments
    assert torch.equal(got["model"][w], src["model"]["shallow_in.conv1.weight"].flip(0))
    assert torch.equal(got["optim"][w]["exp_avg_sq"], src["optim"]["shallow_in.conv1.weight"]["exp_avg_sq"].flip(0))
    # the sources were trained (not their stage-0 initialisation), and the values are not the
    # fresh stage-1 initialisation either: trained weights reached the new stage
    spec = parse_spec(warm_data(), load(extra=[WarmPlugin()]).registry)
    reg = load(extra=[WarmPlugin()]).registry
    init0 = build_stage_model(spec, reg, 0).state_dict()
    init1 = build_stage_model(spec, reg, 1, prev=build_stage_model(spec, reg, 0)).state_dict()
    name = "core.blocks.1.mlp.fc1.weight"
    assert not torch.equal(src["model"]["core.blocks.0.mlp.fc1.weight"], init0["core.blocks.0.mlp.fc1.weight"])
    assert not torch.equal(got["model"][name], init1[name])
    assert all(torch.isfinite(v).all() for v in got["model"].values())
    # untouched new tensors keep their fresh initialisation and get no carried state
    fresh = "encoders.r16.blocks.0.conv1.weight"
    assert torch.equal(got["model"][fresh], init1[fresh]) and fresh not in got["optim"]
    assert got["age"][fresh] == 0


def test_phase_param_groups_log_their_lr(warm_run: tuple[Path, Probe]) -> None:
    out, _ = warm_run
    records = {r["step"]: r for r in read_metrics(out)}
    lr = 1e-3  # warmup_steps=1: phases run at the full lr from their 2nd step
    assert records[8]["lr/stacked"] == pytest.approx(0.1 * lr) and records[8]["lr/all-but-core"] == pytest.approx(lr)
    assert records[12]["lr/all"] == pytest.approx(0.5 * lr) and "lr/stacked" not in records[12]
    assert all(r["loss"] == r["loss"] for r in records.values())  # finite: trained from trained weights


@pytest.mark.parametrize("resume_at", [STAGE0_END, 8, 10])
def test_resume_with_transfers_is_bit_exact(warm_run: tuple[Path, Probe], plugins: Plugins, tmp_path: Path,
                                            resume_at: int) -> None:
    """Resume at the stage boundary (the transfers are applied after the resume) and inside
    stage 1 (the transferred tensors come from the checkpoint): the final model, EMA, AdamW
    state and every logged loss equal the uninterrupted run's, bit for bit."""
    ref, _ = warm_run
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        if int(ckpt.name[5:]) > resume_at:
            shutil.rmtree(ckpt)  # as if killed right after committing step `resume_at`
    spec = parse_spec(yaml.safe_load((ref / "spec.lock.yaml").read_text()), plugins.registry)
    run(spec, plugins, run_dir)
    assert [r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in read_metrics(ref)]
    name = f"checkpoints/step-{TOTAL_STEPS:08d}"
    a, b = consolidate(run_dir / name, tmp_path), consolidate(ref / name, tmp_path)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["optim"].keys() == b["optim"].keys()
    assert all(torch.equal(a["optim"][k][s], b["optim"][k][s]) for k in a["optim"] for s in a["optim"][k])


# --- wrong transfers fail before training -------------------------------------------------------
def _validate(plugins: Plugins, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data: dict[str, Any]) -> int:
    monkeypatch.setattr(cli, "get_plugins", lambda: plugins)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(data))
    return cli.main(["validate", str(spec)])


@pytest.mark.parametrize(("copies", "message"), [
    ({"core.blocks.1": "core.blocks.7"},
     "stages.1.growth: transfers: stage 1: transfer core.blocks.1 <- core.blocks.7: the previous stage has no "
     "tensor or module 'core.blocks.7'"),
    ({"core.blocks.9": "core.blocks.0"},
     "transfer core.blocks.9 <- core.blocks.0: the new model has no tensor or module 'core.blocks.9'"),
    ({"stem.weight": "stem.weight"},
     "transfer stem.weight <- stem.weight: shapes differ: stem.weight (8, 3, 3, 3) vs stem.weight (8, 3, 2, 2)"),
    ({"head": "head"},
     "transfer head.proj.weight <- head.proj.weight: shapes differ: head.proj.weight (3, 8, 3, 3) vs "
     "head.proj.weight (12, 8, 1, 1)"),
])
def test_wrong_transfer_is_a_spec_error_naming_both_tensors(
    plugins: Plugins, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    copies: dict[str, str], message: str,
) -> None:
    data = warm_data()
    data["stages"][1]["growth"].update(copies=copies, fns=False)
    assert _validate(plugins, monkeypatch, tmp_path, data) == 2
    assert message in capsys.readouterr().err


def test_fn_transfer_with_wrong_shape_fails_on_meta() -> None:
    shapes = {"a": torch.Size([4, 2])}
    with pytest.raises(TransferError, match=r"transfer a <- \['a'\]: shapes differ: a \(4, 2\) but the "
                                            r"transfer gives \(2, 4\)"):
        from vermeer_core.transfer import resolve_transfers

        resolve_transfers({"a": Transfer(lambda t: t.t(), ("a",))}, shapes, shapes)


def test_wrong_transfer_stops_the_engine_before_any_step(plugins: Plugins, tmp_path: Path) -> None:
    data = warm_data(checkpoint_every=100)
    data["stages"][1]["growth"].update(copies={"stem.weight": "stem.weight"}, fns=False)
    spec = parse_spec(data, plugins.registry)
    with pytest.raises(RunError, match="growth policy 'test-warm': stage 1: transfer stem.weight <- stem.weight"):
        run(spec, plugins, tmp_path / "run")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 7))  # stage 1 never stepped


# --- prev holds structure only ----------------------------------------------------------------
class CopyFromPrev(WarmStart):
    """The mistake the contract forbids: deep-copying a module of ``prev`` into a new position."""

    def grow(self, prev: VermeerModel | None, ctx: GrowthContext) -> VermeerModel:
        model = super().grow(prev, ctx)
        if prev is not None:
            model.core.blocks[1] = copy.deepcopy(prev.core.blocks[0])
        model.transfers.clear()
        return model


class CopyPlugin:
    @hookimpl
    def vermeer_register(self, registry: Registry) -> None:
        registry.add("growth_policy", "test-copy", CopyFromPrev, WarmConfig)


def test_prev_at_run_time_is_structure_only_and_copying_it_is_refused(tmp_path: Path) -> None:
    plugins = load(extra=[CopyPlugin()])
    data = warm_data(checkpoint_every=100)
    for st in data["stages"]:
        st["growth"]["type"] = "test-copy"
    spec = parse_spec(data, plugins.registry)
    prev = replay(spec, plugins.registry, 0, device="meta")
    assert all(p.is_meta for p in prev.parameters())  # what grow() receives in a run
    with pytest.raises(RunError, match="new tensor core.blocks.1.attn.qkv.weight is on the meta device: it "
                                       "was copied from the previous stage's model"):
        run(spec, plugins, tmp_path / "run")


# --- real processes ----------------------------------------------------------------------------
def plugin_env(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH that installs the test policy for subprocesses (torchrun workers included):
    a dist-info with a ``vermeer`` entry point ``test-warm = warm_policy:PLUGIN``."""
    site = tmp_path / "site"
    info = site / "vermeer_test_warm-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vermeer-test-warm\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[vermeer]\ntest-warm = warm_policy:PLUGIN\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow  # ~35 s: two CLI processes
def test_kill_at_the_growth_step_resumes_bit_exactly_with_transfers(warm_run: tuple[Path, Probe],
                                                                     tmp_path: Path) -> None:
    """SIGKILL right after the stage-0 checkpoint commits (test_resume.py's fault injection),
    then a fresh process resumes: it replays stage 0, applies the transfers to the restored
    state and ends bit-identical to the uninterrupted in-process run."""
    ref, _ = warm_run
    spec = tmp_path / "s.yaml"
    spec.write_text((ref / "spec.lock.yaml").read_text())
    out = tmp_path / "run"
    env = plugin_env(tmp_path)
    killed = run_cli(["run", str(spec), "--out", str(out)], fault=f"after-marker:{STAGE0_END}", env=env)
    assert killed.returncode == -9, killed.stderr
    assert max(r["step"] for r in read_metrics(out)) == STAGE0_END
    resumed = run_cli(["run", str(spec), "--out", str(out)], env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {STAGE0_END} (stage 0, phase core)" in resumed.stderr
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(ref)]
    name = f"checkpoints/step-{TOTAL_STEPS:08d}"
    a, b = consolidate(out / name, tmp_path), consolidate(ref / name, tmp_path)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in b[part]), part
    assert all(torch.equal(a["optim"][k][s], b["optim"][k][s]) for k in b["optim"] for s in b["optim"][k])


# --- world size 2: transfers on sharded tensors ------------------------------------------------
@pytest.mark.slow  # ~40 s: two torchrun workers
def test_transfers_at_world_size_2_match_world_size_1(warm_run: tuple[Path, Probe], tmp_path: Path) -> None:
    """torchrun, 2 ranks (gloo, FSDP2 on CPU): the transfers run on DTensor shards (copies as
    local clones, functions on the full tensors re-split), and the run equals world size 1
    within the float tolerance of tests/test_distributed.py."""
    ref, _ = warm_run
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(warm_data(checkpoint_every=6)))
    out = tmp_path / "run"
    r = run_cli(["run", str(spec), "--out", str(out), "--nproc-per-node", "2"], env=plugin_env(tmp_path))
    assert r.returncode == 0, r.stderr
    a, b = read_metrics(ref), read_metrics(out)
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
        assert y.get("lr/stacked") == x.get("lr/stacked")
    name = f"checkpoints/step-{TOTAL_STEPS:08d}"
    final_ref, final_ws2 = consolidate(ref / name, tmp_path), consolidate(out / name, tmp_path)
    for k, v in final_ref["model"].items():
        torch.testing.assert_close(final_ws2["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
