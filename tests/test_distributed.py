"""World size 2 (torchrun, gloo, FSDP2 on CPU) against world size 1: same losses within a
stated tolerance, half the per-rank parameter and optimizer memory, and a checkpoint written by
2 ranks loads and trains on at world size 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from engine_spec import BASE, STAGE0_END, TOTAL_STEPS, consolidate, read_metrics, reference_run, write_spec
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from vermeer_core.cli import main
from vermeer_core.distributed import init_distributed, shutdown
from vermeer_core.engine import Engine
from vermeer_core.plugins import get_plugins
from vermeer_core.spec import parse_spec

#: Relative tolerance between world sizes. The random numbers are identical (each image's
#: noise is seeded by its position in the global batch), so only float rounding differs: fp32
#: sums in another order (the gradient reduce-scatter over 2 ranks instead of one batch sum,
#: 1 thread per rank instead of 2 in matmuls), ~1e-7 relative per operation, grown by the 12
#: AdamW steps. Measured: ~1e-7; a real difference (e.g. other noise for an image) is ~1e-2.
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(world-size-1 reference run, world-size-2 run of the same spec)."""
    ref = reference_run(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("ws2")
    spec = write_spec(tmp / "s.yaml")
    out = tmp / "run"
    # the launching CLI in this process (it starts torchrun, whose 2 ranks are real processes; their
    # output goes to pytest's captured output)
    assert main(["run", str(spec), "--out", str(out), "--nproc-per-node", "2", "--set", "train.checkpoint_every=6"]) == 0
    return ref, out


def test_world_size_2_matches_world_size_1(runs: tuple[Path, Path]) -> None:
    ref, ws2 = (read_metrics(p) for p in runs)
    assert [r["step"] for r in ws2] == [r["step"] for r in ref] == list(range(1, TOTAL_STEPS + 1))
    for a, b in zip(ref, ws2):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), a["step"]
        assert (b["stage"], b["phase"], b["lr"]) == (a["stage"], a["phase"], a["lr"])


def test_per_rank_state_memory_halves(runs: tuple[Path, Path]) -> None:
    ref, ws2 = (read_metrics(p) for p in runs)
    for a, b in zip(ref, ws2):
        # the largest rank's share: FSDP2 shards dim 0, so odd sizes give rank 0 one row more
        for key in ("param_bytes", "optim_bytes"):
            assert 0.45 < b[key] / a[key] < 0.56, (a["step"], key, a[key], b[key])


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def test_world_size_2_checkpoint_loads_at_world_size_1(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """The engine's own load path (DCP resharding 2 shards into 1) restores exactly what the 2
    ranks saved: model, EMA and optimizer state."""
    _, ws2 = runs
    url = ws2 / "checkpoints" / f"step-{TOTAL_STEPS:08d}"
    saved = consolidate(url, tmp_path)
    plugins = get_plugins()
    spec = parse_spec(BASE, plugins.registry)
    d = init_distributed(device="cpu")
    try:
        assert d.world_size == 1
        engine = Engine(spec, plugins, str(ws2), d)
        model, ema = engine._stage_model(1, None)
        optim = engine._load(str(url), model, ema, engine.ckpt.read_meta(str(url))["optim_names"])
        loaded = {k: _full(v) for k, v in get_model_state_dict(model).items()}
        shadow = {k: _full(v) for k, v in ema.shadow.items()}
        state = {n: {k: _full(v) for k, v in s.items()} for n, s in optim.items()}
    finally:
        shutdown()
    assert loaded.keys() == saved["model"].keys() and shadow.keys() == saved["ema"].keys()
    assert all(torch.equal(loaded[k], saved["model"][k]) for k in loaded)
    assert all(torch.equal(shadow[k], saved["ema"][k]) for k in shadow)
    assert state.keys() == saved["optim"].keys()
    for n, s in state.items():
        assert all(torch.equal(s[k], saved["optim"][n][k]) for k in s), n


def test_training_continues_at_world_size_1_from_a_world_size_2_checkpoint(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two more steps of phase B (an allowed change) from the world-size-2 checkpoint and from
    the world-size-1 one give the same losses: weights, optimizer and data position carry over
    (the synthetic data maps rank 0's position onto world size 1 exactly)."""
    losses = []
    for i, run in enumerate(runs):
        dst = tmp_path / f"run{i}"
        shutil.copytree(run, dst)
        shutil.copy(run / "spec.lock.yaml", tmp_path / f"spec{i}.yaml")
        rc = main(["run", str(tmp_path / f"spec{i}.yaml"), "--out", str(dst), "--set", "stages.1.growth.phases.1.steps=6"])
        assert rc == 0
        err = capsys.readouterr().err
        assert "resuming from step 12 (stage 1, phase B)" in err
        assert ("was written by 2 ranks, this run has 1" in err) == (i == 1)
        records = read_metrics(dst)
        assert [r["step"] for r in records][-2:] == [13, 14]
        losses.append([r["loss"] for r in records[-2:]])
    assert losses[1] == pytest.approx(losses[0], rel=RTOL)


def test_a_world_size_2_branch_from_a_world_size_1_checkpoint(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """``--from`` through torchrun: 2 ranks start stage 1 from the world-size-1 reference's
    stage-0 checkpoint (resharded) and log its losses within the world-size tolerance."""
    ref, _ = runs
    spec = write_spec(tmp_path / "s.yaml")
    out = tmp_path / "branch"
    src = ref / "checkpoints" / f"step-{STAGE0_END:08d}"
    assert main(["run", str(spec), "--from", str(src), "--out", str(out), "--nproc-per-node", "2"]) == 0
    mine, theirs = read_metrics(out), read_metrics(ref)
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]
    for a, b in zip(theirs, mine):
        if a["step"] <= STAGE0_END:
            assert b == a  # copied
        else:
            assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), a["step"]


def test_hybrid_sharding_replicates_across_groups(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """train.replicate=2 at world size 2: two replica groups of one shard each (HSDP). Same
    losses as world size 1 (the gradient is averaged across replicas), and each rank holds the
    whole model and optimizer state, unlike plain FSDP's halves."""
    ref = read_metrics(runs[0])
    spec = write_spec(tmp_path / "s.yaml")
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out), "--nproc-per-node", "2",
                 "--set", "train.replicate=2", "--set", "train.checkpoint_every=6"]) == 0
    hsdp = read_metrics(out)
    assert [x["step"] for x in hsdp] == [x["step"] for x in ref]
    for a, b in zip(ref, hsdp):
        assert b["loss"] == pytest.approx(a["loss"], rel=RTOL), a["step"]
        assert b["param_bytes"] == a["param_bytes"] and b["optim_bytes"] == a["optim_bytes"]
