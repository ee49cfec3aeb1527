"""The engine end to end: outputs of a run, lifecycle hooks, non-finite losses, spec changes on
resume, refusals, and sampling/export from what a run wrote."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from engine_spec import (
    PHASE_OF_STEP,
    STAGE0_END,
    TOTAL_STEPS,
    committed_steps,
    consolidate,
    read_metrics,
    reference_run,
    spec_data,
    write_spec,
)
from PIL import Image
from torch.distributed.tensor import DTensor

from vermeer_core.cli import main
from vermeer_core.distributed import init_distributed, shutdown
from vermeer_core.engine import Engine
from vermeer_core.hookspecs import hookimpl
from vermeer_core.inference import load_checkpoint
from vermeer_core.interfaces import Phase
from vermeer_core.model import VermeerModel
from vermeer_core.plugins import get_registry, load
from vermeer_core.spec import parse_spec


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference_run(tmp_path_factory)


def _copy(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``run`` and of its spec.lock.yaml (the spec to resume it with)."""
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    spec = tmp_path / "spec.yaml"
    shutil.copy(run / "spec.lock.yaml", spec)
    return dst, spec


# --- a whole run's outputs ----------------------------------------------------------------------
def test_metrics_one_record_per_log_step(reference: Path) -> None:
    records = read_metrics(reference)
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))  # log_every=1
    for r in records:
        assert (r["stage"], r["phase"]) == PHASE_OF_STEP[r["step"]]
        assert r["resolution"] == (8, 16)[r["stage"]]
        for key in ("loss", "lr", "grad_norm", "images_per_s", "tflops"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["mfu"] is None  # no known peak for a CPU
        assert r["mem_bytes"] > 0 and r["param_bytes"] > 0 and r["optim_bytes"] > 0
        assert r["skipped_steps"] == 0
        # warmup_steps=1, constant decay: base lr, halved in phase B (lr_mult 0.5)
        assert r["lr"] == pytest.approx(1e-3 * (0.5 if r["phase"] == "B" else 1.0))
    # phase A trains only the new layers but the frozen core's Adam state is parked, not dropped
    a = next(r for r in records if r["phase"] == "A")
    assert a["optim_bytes"] >= next(r for r in records if r["phase"] == "core")["optim_bytes"]


def test_spec_lock_samples_plot_and_checkpoints(reference: Path) -> None:
    lock = yaml.safe_load((reference / "spec.lock.yaml").read_text())
    assert lock == parse_spec(spec_data(checkpoint_every=6), get_registry()).model_dump(mode="json")
    for stage, res in enumerate((8, 16)):
        png = reference / "samples" / f"stage{stage}-{res}px.png"
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (res + 4, res + 4)  # one image, 2 px padding
        assert (reference / "samples" / f"stage{stage}-{res}px.txt").read_text() == "0: a large red circle\n"
    with Image.open(reference / "loss.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    ckpts = reference / "checkpoints"
    # checkpoint_every=6: the two stage ends (pruning: see the hooks test)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000006", "step-00000012"]
    assert committed_steps(reference) == [6, 12]
    assert (ckpts / "latest").read_text().strip() == "step-00000012"
    meta = json.loads((ckpts / "step-00000012" / "meta.json").read_text())
    assert (meta["step"], meta["stage"], meta["phase_name"], meta["world_size"]) == (12, 1, "B", 1)


# --- hooks --------------------------------------------------------------------------------------
class Recorder:
    """A plugin recording every lifecycle hook call (registered via ``load(extra=[...])``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def vermeer_stage_start(self, stage: int, resolution: int, model: Any, run_dir: str) -> None:
        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        self.calls.append(("stage_start", {"stage": stage, "resolution": resolution, "model": model,
                                           "run_dir": run_dir, "sharded": sharded}))

    @hookimpl
    def vermeer_phase_start(self, stage: int, phase: Phase, step: int, phase_step: int, model: Any,
                            optimizer: torch.optim.Optimizer) -> None:
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.calls.append(("phase_start", {
            "stage": stage, "phase": phase, "step": step, "phase_step": phase_step,
            "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
            "optimizer_is_trainable": in_optimizer == trainable,
            "core_trains": any(p.requires_grad for n, p in model.named_parameters() if n.startswith("core.")),
        }))

    @hookimpl
    def vermeer_step_end(self, stage: int, phase: Phase, step: int, phase_step: int, model: Any,
                         metrics: dict[str, Any] | None, skipped: torch.Tensor) -> None:
        self.calls.append(("step_end", {"stage": stage, "phase": phase.name, "step": step, "phase_step": phase_step,
                                        "metrics": None if metrics is None else dict(metrics),
                                        "training": model.training, "skipped": skipped}))

    @hookimpl
    def vermeer_phase_end(self, stage: int, phase: str, step: int, metrics: dict[str, float]) -> None:
        self.calls.append(("phase_end", {"stage": stage, "phase": phase, "step": step, "metrics": dict(metrics)}))

    @hookimpl
    def vermeer_checkpoint_saved(self, url: str, step: int) -> None:
        self.calls.append(("checkpoint_saved", {"url": url, "step": step,
                                                "committed": (Path(url) / "COMMITTED").exists()}))


def test_lifecycle_hooks_called_with_documented_arguments(tmp_path: Path) -> None:
    rec = Recorder()
    plugins = load(extra=[rec])
    spec = parse_spec(spec_data(log_every=5, checkpoint_every=4), plugins.registry)
    out = str(tmp_path / "run")
    d = init_distributed(device="cpu")
    try:
        Engine(spec, plugins, out, d).run()
    finally:
        shutdown()
    starts = [c for n, c in rec.calls if n == "stage_start"]
    assert [(c["stage"], c["resolution"], c["run_dir"], c["sharded"]) for c in starts] == [
        (0, 8, out, False), (1, 16, out, False)]  # called before sharding
    assert all(isinstance(c["model"], VermeerModel) for c in starts)
    ends = [c for n, c in rec.calls if n == "phase_end"]
    assert [(c["stage"], c["phase"], c["step"]) for c in ends] == [(0, "core", 6), (1, "A", 8), (1, "B", 12)]
    for c in ends:  # the last logged values: a phase's end is always logged
        assert c["metrics"]["step"] == c["step"] and c["metrics"]["phase"] == c["phase"]
        assert math.isfinite(c["metrics"]["loss"])
    saved = [c for n, c in rec.calls if n == "checkpoint_saved"]
    # every 4 steps, plus every stage's end
    assert [c["step"] for c in saved] == [4, 6, 8, 12]
    assert all(c["committed"] for c in saved)  # called after the marker exists
    assert [c["url"] for c in saved] == [f"{out}/checkpoints/step-{s:08d}" for s in (4, 6, 8, 12)]
    # order: stage 1 starts after stage 0's end was checkpointed
    names = [(n, c.get("step", c.get("stage"))) for n, c in rec.calls]
    assert names.index(("stage_start", 1)) > names.index(("checkpoint_saved", STAGE0_END))
    # log_every=5: every 5th step and every phase's last
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [5, 6, 8, 10, 12]
    # phase start: after the phase's trainable set and optimizer exist, on the sharded model
    pstarts = [c for n, c in rec.calls if n == "phase_start"]
    assert [(c["stage"], c["phase"].name, c["phase"].steps, c["step"], c["phase_step"]) for c in pstarts] == [
        (0, "core", 6, 0, 0), (1, "A", 2, 6, 0), (1, "B", 4, 8, 0)]
    assert all(c["sharded"] and c["optimizer_is_trainable"] for c in pstarts)
    assert [c["core_trains"] for c in pstarts] == [True, False, True]  # phase A freezes the core
    # step end: every step, in order, with metrics only on log steps (the record just written)
    ends_ = [c for n, c in rec.calls if n == "step_end"]
    assert [c["step"] for c in ends_] == list(range(1, 13))
    assert [(c["stage"], c["phase"]) for c in ends_] == [PHASE_OF_STEP[s] for s in range(1, 13)]
    assert [c["phase_step"] for c in ends_] == [1, 2, 3, 4, 5, 6, 1, 2, 1, 2, 3, 4]
    assert all(c["training"] for c in ends_)
    assert all(isinstance(c["skipped"], torch.Tensor) and c["skipped"].ndim == 0 and float(c["skipped"]) == 0.0
               for c in ends_)
    logged = {c["step"]: c["metrics"] for c in ends_ if c["metrics"] is not None}
    assert sorted(logged) == [5, 6, 8, 10, 12]
    for r in records:
        assert json.loads(json.dumps(logged[r["step"]])) == r
    # each phase: start, its steps, end; a step's hook runs before that step's checkpoint
    order = [(n, c.get("step")) for n, c in rec.calls]
    assert order.index(("phase_start", 6)) < order.index(("step_end", 7)) < order.index(("phase_end", 8))
    assert order.index(("step_end", 4)) < order.index(("checkpoint_saved", 4)) < order.index(("step_end", 5))
    # keep_checkpoints=3: the oldest save was pruned; `latest` names the newest
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000006", "step-00000008", "step-00000012"]
    assert committed_steps(tmp_path / "run") == [6, 8, 12]
    assert (ckpts / "latest").read_text().strip() == "step-00000012"


def test_phase_start_on_resume_mid_phase(reference: Path, tmp_path: Path) -> None:
    """Resuming inside a phase calls ``vermeer_phase_start`` with the steps already done, then
    ``vermeer_step_end`` for the remaining steps only."""
    run, spec_path = _copy(reference, tmp_path)
    data = yaml.safe_load(spec_path.read_text())
    data["stages"][1]["growth"]["phases"][1]["steps"] = 6  # phase B: 4 steps done, 2 more
    rec = Recorder()
    plugins = load(extra=[rec])
    d = init_distributed(device="cpu")
    try:
        Engine(parse_spec(data, plugins.registry), plugins, str(run), d).run()
    finally:
        shutdown()
    calls = [(n, c) for n, c in rec.calls if n in ("phase_start", "step_end")]
    assert [(n, c["phase"] if n == "step_end" else c["phase"].name, c["step"], c["phase_step"]) for n, c in calls] == [
        ("phase_start", "B", 12, 4), ("step_end", "B", 13, 5), ("step_end", "B", 14, 6)]


# --- non-finite losses ----------------------------------------------------------------------------
def test_nonfinite_step_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path / "s.yaml", spec_data(checkpoint_every=100, max_skipped_fraction=0.2))
    monkeypatch.setenv("VERMEER_FAULT", "nan:3-3")
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out), "--set", "stages.1.growth.phases.1.steps=1"]) == 0
    err = capsys.readouterr().err
    assert "step 3: non-finite loss/gradient, step skipped (1 in a row)" in err
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 4, 5, 6, 7, 8, 9]  # step 3 skipped, not logged
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in records)


def test_too_many_nonfinite_steps_stop_with_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(tmp_path / "s.yaml", spec_data(max_skipped_fraction=1.0))
    out = tmp_path / "run"
    monkeypatch.setenv("VERMEER_FAULT", "nan:3-5")  # max_bad_steps=3
    assert main(["run", str(spec), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    good = out / "checkpoints" / "step-00000002"
    assert (f"loss was not finite for 3 steps in a row (stage 0, phase core, step 5); stopped. "
            f"Last good checkpoint: {good}") in err
    assert "Traceback" not in err
    assert committed_steps(out) == [2]  # step 4's checkpoint was not written after a bad step
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    spec_obj, model, stage = load_checkpoint(str(good), get_registry(), weights="model")
    assert stage == 0 and all(torch.isfinite(p).all() for p in model.parameters())
    # ...and the run resumes from it once the cause is gone
    monkeypatch.delenv("VERMEER_FAULT")
    assert main(["run", str(spec), "--out", str(out), "--set", "stages.1.growth.phases.1.steps=1"]) == 0
    assert "resuming from step 2 (stage 0, phase core)" in capsys.readouterr().err
    assert committed_steps(out)[-1] == 9


# --- spec changes and refusals ---------------------------------------------------------------------
def test_changed_spec_on_resume_is_refused_naming_fields(reference: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run, spec = _copy(reference, tmp_path)
    lock = (run / "spec.lock.yaml").read_text()
    rc = main(["run", str(spec), "--out", str(run), "--set", "optim.lr=0.002", "--set", "model.core.depth=2",
               "--set", "train.log_every=3"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "changed fields that a resume cannot take" in err
    assert "model.core.depth (1 -> 2)" in err and "optim.lr (0.001 -> 0.002)" in err
    assert "log_every" not in err  # allowed changes are not listed as refused
    assert (run / "spec.lock.yaml").read_text() == lock  # nothing written
    assert committed_steps(run) == [6, 12]


def test_allowed_spec_change_on_resume_continues(reference: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run, spec = _copy(reference, tmp_path)
    rc = main(["run", str(spec), "--out", str(run), "--set", "train.log_every=2",
               "--set", "stages.1.growth.phases.1.steps=5"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "resuming with changed fields (allowed): stages.1.growth.phases.1.steps, train.log_every" in err
    assert "resuming from step 12 (stage 1, phase B)" in err
    assert read_metrics(run)[-1]["step"] == 13  # one more step of phase B
    assert committed_steps(run) == [6, 12, 13]
    assert yaml.safe_load((run / "spec.lock.yaml").read_text())["train"]["log_every"] == 2


def test_resume_never_refuses_a_dir_with_checkpoints(reference: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run, spec = _copy(reference, tmp_path)
    assert main(["run", str(spec), "--out", str(run), "--resume", "never"]) == 1
    assert "already holds checkpoints; use --resume auto" in capsys.readouterr().err
    assert committed_steps(run) == [6, 12]


def test_invalid_spec_exits_2_before_creating_the_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path / "s.yaml")
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out), "--set", "stages.1.resolution=12"]) == 2
    assert "stages.1.resolution: 12 is not grid*2^k" in capsys.readouterr().err
    assert not out.exists()


# --- sample and export ------------------------------------------------------------------------------
def test_sample_from_checkpoint_run_dir_and_export_agree(reference: Path, tmp_path: Path) -> None:
    ckpt = reference / "checkpoints" / "step-00000012"
    weights = tmp_path / "model.safetensors"
    assert main(["export", str(reference), "--out", str(weights)]) == 0
    prompt = ["--prompt", "a small blue square", "--steps", "2"]
    images = {}
    for name, src, seed in (("ckpt", ckpt, 3), ("run", reference, 3), ("export", weights, 3), ("other", ckpt, 4)):
        png = tmp_path / f"{name}.png"
        assert main(["sample", str(src), *prompt, "--seed", str(seed), "--out", str(png)]) == 0
        with Image.open(png) as im:
            assert im.size == (16, 16)
            images[name] = torch.from_numpy(np.asarray(im).copy())
    assert torch.equal(images["ckpt"], images["run"]) and torch.equal(images["ckpt"], images["export"])
    assert not torch.equal(images["ckpt"], images["other"])  # the seed matters


def test_export_holds_consolidated_ema_and_spec(reference: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    weights = tmp_path / "model.safetensors"
    assert main(["export", str(reference / "checkpoints" / "step-00000006"), "--out", str(weights)]) == 0
    full = consolidate(reference / "checkpoints" / "step-00000006", tmp_path)
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta["vermeer_spec"]) == yaml.safe_load((reference / "spec.lock.yaml").read_text())
    assert (meta["stage"], meta["resolution"]) == ("0", "8")
    assert set(full["ema"]) <= set(tensors) and set(tensors) == set(full["model"])
    for name, t in tensors.items():  # EMA weights where the EMA has them, buffers from the model
        assert torch.equal(t, full["ema"].get(name, full["model"][name])), name
    # the EMA differs from the raw weights (else this test could not tell them apart)
    assert any(not torch.equal(full["ema"][k], full["model"][k]) for k in full["ema"])
