"""The flat train step: no host-device sync inside a step, a non-finite step skipped on the
device (parameters, AdamW moments and step count, EMA and its age untouched), fused AdamW where
torch has the kernel, and non-finite steps noticed late but counted exactly when ``log_every``
is long."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from engine_spec import committed_steps, read_metrics, spec_data, write_spec
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vermeer_core import step as step_mod
from vermeer_core.cli import main
from vermeer_core.ema import EMA
from vermeer_core.optim import build_optimizer, state_skeleton
from vermeer_core.step import TrainStep


class SyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: every device-to-host read of a tensor value
    (``item``, ``float``, ``bool``, ``tolist``, a 0-d tensor passed as a Python scalar)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _tiny(fused: bool | None = None) -> tuple[nn.Module, EMA, torch.optim.Optimizer, TrainStep]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    names = {n for n, _ in model.named_parameters()}
    opt = build_optimizer(model, names, {}, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, fused=fused)
    ema = EMA(model, 0.9, power=2 / 3)

    def loss_fn(m: nn.Module, images: torch.Tensor, captions: Any, generator: Any) -> torch.Tensor:
        return (m(images) - generator[0].initial_seed() % 7).pow(2).mean()

    ts = TrainStep(model=model, ema=ema, opt=opt, trainable=names, loss_fn=loss_fn, lr_at=lambda s: 1e-2,
                   first=0, seed=1, grad_clip=1.0, device=torch.device("cpu"), rank=0, world_size=1,
                   local_batch=1, autocast_bf16=False)
    return model, ema, opt, ts


def _batch() -> SimpleNamespace:
    return SimpleNamespace(images=torch.randn(1, 4), captions=[""])


def _snapshot(model: nn.Module, ema: EMA, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"p/{n}": p.detach().clone() for n, p in model.named_parameters()}
    out |= {f"ema/{n}": t.clone() for n, t in ema.shadow.items()}
    for i, s in enumerate(opt.state.values()):
        out |= {f"opt/{i}/{k}": v.clone() for k, v in s.items()}
    return out


def test_fused_adamw_is_picked_on_cpu() -> None:
    _, _, opt, _ = _tiny()
    assert opt.defaults["fused"] is True


def test_a_step_reads_nothing_from_the_device() -> None:
    _, _, _, ts = _tiny()
    ts(_batch())  # first step: the optimizer creates its state
    with SyncCounter() as counter:
        for _ in range(3):
            result = ts(_batch())
    assert counter.reads == 0
    assert result.step == 4 and float(result.skipped) == 0.0
    with SyncCounter() as counter:  # the counter does see a read: the test can fail
        float(result.loss)
    assert counter.reads == 1


@pytest.mark.parametrize("fused", [True, False])
def test_a_nonfinite_step_changes_nothing(monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    model, ema, opt, ts = _tiny(fused)
    for _ in range(2):
        ts(_batch())
    before, age = _snapshot(model, ema, opt), dict(ema.age)
    monkeypatch.setenv("VERMEER_FAULT", "nan:3-3")
    result = ts(_batch())
    assert float(result.skipped) == 1.0 and not torch.isfinite(result.loss)
    after = _snapshot(model, ema, opt)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), [k for k in before if not torch.equal(after[k], before[k])]
    assert ema.age == age
    assert all(p.grad is None for p in model.parameters())
    good = ts(_batch())  # and the next step trains again, counting on from the last applied one
    assert float(good.skipped) == 0.0
    assert not torch.equal(model[0].weight, before["p/0.weight"])
    assert [float(s["step"]) for s in opt.state.values()] == [3.0] * len(opt.state)
    assert set(ema.age.values()) == {3}


def test_state_skeleton_matches_the_optimizer_state() -> None:
    model, _, opt, ts = _tiny()
    ts(_batch())
    names = [n for n, _ in model.named_parameters()]
    skel = state_skeleton(model, [*names, "gone.weight"])
    assert list(skel) == names  # a name the model lacks is dropped
    live_by_name = {opt._vermeer_names[p]: st for p, st in opt.state.items()}  # type: ignore[attr-defined]
    for name, s in skel.items():
        live = live_by_name[name]
        assert s.keys() == live.keys()
        assert all(s[k].shape == live[k].shape and s[k].dtype == live[k].dtype and s[k].device == live[k].device
                   for k in s)


def test_nonfinite_steps_between_log_steps_are_counted_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a long ``log_every`` the device is read only at the phase's end; the stop names the
    step that broke the limit and when it was noticed, and no checkpoint follows it."""
    spec = write_spec(tmp_path / "s.yaml", spec_data(log_every=100, checkpoint_every=100))
    out = tmp_path / "run"
    monkeypatch.setenv("VERMEER_FAULT", "nan:3-3")  # 1 of stage 0's 6 steps: > max_skipped_fraction 0.1
    assert main(["run", str(spec), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "step 3: non-finite loss/gradient, step skipped (1 in a row)" in err
    assert ("phase core of stage 0 skipped 1 of its 6 steps as non-finite (step 3) (noticed at step 6, when the "
            "device was read), more than train.max_skipped_fraction=0.1") in err
    assert committed_steps(out) == [] and read_metrics(out) == []


def test_engine_steps_do_not_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's own steps (FSDP2, the real model and loss) read no device value between
    log steps, not even a phase's first (where the optimizer creates its state)."""
    reads: list[int] = []
    call = TrainStep.__call__

    def counted(self: TrainStep, batch: Any) -> Any:
        with SyncCounter() as counter:
            result = call(self, batch)
        reads.append(counter.reads)
        return result

    monkeypatch.setattr(step_mod.TrainStep, "__call__", counted)
    spec = write_spec(tmp_path / "s.yaml", spec_data(log_every=100, checkpoint_every=100))
    assert main(["run", str(spec), "--out", str(tmp_path / "run")]) == 0
    assert len(reads) == 12
    assert sum(reads) == 0, reads


def test_fsdp_settings_change_no_numbers_and_reshard_all_restores_shards() -> None:
    """Every FSDP2 setting the benchmark compares gives the same step; after a forward without
    backward (sampling) with ``reshard_after_forward=False`` units stay gathered until
    :func:`reshard_all`, after which the parameters are the sharded DTensors again."""
    from tiny_model_spec import tiny_spec
    from torch.distributed.tensor import DTensor

    from vermeer_core.distributed import init_distributed, parallelize, reshard_all, shutdown
    from vermeer_core.model import build_stage_model
    from vermeer_core.plugins import get_registry

    spec = tiny_spec((64,))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    logsnr = torch.tensor([1.0, -2.0])
    d = init_distributed(device="cpu")
    try:
        grads = []
        for reshard, prefetch in ((True, 0), (True, 1), (False, 0), (False, 1)):
            torch.manual_seed(0)
            model = build_stage_model(spec, get_registry(), 0)
            parallelize(model, d.mesh, reshard_after_forward=reshard, prefetch=prefetch)
            model(x, logsnr, ["a red circle", ""]).square().mean().backward()
            grads.append([p.grad.full_tensor() for p in model.parameters()])
            with torch.no_grad():
                model(x, logsnr, ["a red circle", ""])
            gathered = not all(isinstance(p, DTensor) for p in model.core.blocks[0].parameters())
            assert gathered == (not reshard)
            reshard_all(model)
            assert all(isinstance(p, DTensor) for p in model.parameters())
    finally:
        shutdown()
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], g))
