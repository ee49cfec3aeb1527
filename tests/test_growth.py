"""Growth policies ``greedy`` and ``from-scratch`` and the growth mechanics around them."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from tiny_model_spec import tiny_spec

from vermeer_core.interfaces import GrowthPolicy, Phase
from vermeer_core.model import (
    CORE_MODULES,
    VermeerModel,
    apply_phase,
    build_stage_model,
    replay,
    select_trainable,
    stage_phases,
)
from vermeer_core.plugins import get_registry


@pytest.fixture(scope="module")
def reg():
    return get_registry()


def grow_all(spec, reg, upto: int | None = None) -> list[VermeerModel]:
    models: list[VermeerModel] = []
    for k in range(len(spec.stages) if upto is None else upto + 1):
        models.append(build_stage_model(spec, reg, k, prev=models[-1] if models else None))
    return models


def forward(model: VermeerModel, batch: int = 1) -> torch.Tensor:
    r = model.resolution
    x = torch.randn(batch, 3, r, r, generator=torch.Generator().manual_seed(0))
    text = model.encode_text(["a red circle", "two blue squares"][:batch])
    return model(x, torch.linspace(-5.0, 5.0, batch), text)


def loss(model: VermeerModel) -> torch.Tensor:
    out = forward(model, batch=2)
    return (out - torch.ones_like(out)).square().mean()  # a non-zero target: the head starts at 0


def pairs(*resolutions: int) -> set[str]:
    return {f"{side}.r{r}" for side in ("encoders", "decoders") for r in resolutions}


def params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


def test_registered_policies_follow_the_protocol(reg) -> None:
    for name in ("greedy", "from-scratch"):
        policy = reg.build(reg.parse("growth_policy", {"type": name}), "growth_policy")
        assert isinstance(policy, GrowthPolicy)


def test_greedy_from_core_resolution_to_1024_has_the_right_shapes(reg) -> None:
    spec = tiny_spec((64, 128, 256, 512, 1024))
    model = None
    for k, stage in enumerate(spec.stages):
        model = build_stage_model(spec, reg, k, prev=model)
        r = stage.resolution
        topo = model.topology()
        assert topo["resolution"] == r and topo["grid"] == 16
        if k == 0:
            assert (topo["kind"], topo["stem_factor"], topo["encoders"]) == ("shallow-uvit", 4, [])
        else:
            assert topo["kind"] == "unet" and topo["stem_factor"] == 1
            assert topo["encoders"] == [r // 2**i for i in range(len(topo["encoders"]))]
            assert topo["encoders"][-1] == 32  # the innermost stage feeds the 16x16 core
        with torch.no_grad():
            out = forward(model)
        assert out.shape == (1, 3, r, r)
        assert torch.isfinite(out).all()


def test_greedy_keeps_core_tensors_bit_identical(reg) -> None:
    spec = tiny_spec((64, 128))
    m0 = build_stage_model(spec, reg, 0)
    # Make the core's values distinctive (as after training) so a re-init could not match.
    with torch.no_grad():
        for p in m0.core.parameters():
            p.add_(torch.randn_like(p))
    before = {n: (p, p.detach().clone()) for n, p in params(m0).items() if n.split(".")[0] in CORE_MODULES}
    m1 = build_stage_model(spec, reg, 1, prev=m0)
    after = params(m1)
    assert "core.blocks.0.attn.qkv.weight" in after
    for name, (tensor, value) in before.items():
        assert after[name] is tensor, name
        assert after[name].data_ptr() == tensor.data_ptr()
        assert torch.equal(after[name], value)


def test_greedy_replaces_periphery_and_keeps_stages(reg) -> None:
    spec = tiny_spec((64, 128, 256))
    m0, m1, m2 = grow_all(spec, reg)
    assert m0.shallow_in is not None and m0.shallow_out is not None
    assert m1.shallow_in is None and m1.shallow_out is None
    assert not any(n.startswith("shallow_") for n in params(m1))
    for old, new in ((m0, m1), (m1, m2)):
        assert new.stem is not old.stem and new.head is not old.head
        old_ids = {id(p) for p in old.parameters()}
        assert not any(id(p) in old_ids for p in (*new.stem.parameters(), *new.head.parameters()))
    for key in ("r128", "r64", "r32"):  # keep_stages: the stage-1 pairs live on in stage 2
        assert m2.encoders[key] is m1.encoders[key] and m2.decoders[key] is m1.decoders[key]


def test_greedy_without_keep_stages_rebuilds_stages_but_keeps_core(reg) -> None:
    spec = tiny_spec((64, 128, 256), growth={"type": "greedy", "keep_stages": False})
    _, m1, m2 = grow_all(spec, reg)
    assert m2.core is m1.core and m2.text is m1.text and m2.cond is m1.cond
    for key in ("r128", "r64", "r32"):
        assert m2.encoders[key] is not m1.encoders[key]
    assert m2.new_modules == {"stem", "head"} | pairs(256, 128, 64, 32)


def test_new_modules_are_exactly_the_new_tensors(reg) -> None:
    spec = tiny_spec((64, 128, 256))
    m0, m1, m2 = grow_all(spec, reg)
    assert m0.new_modules == {"text", "cond", "core", "stem", "shallow_in", "shallow_out", "head"}
    assert m1.new_modules == {"stem", "head"} | pairs(128, 64, 32)
    assert m2.new_modules == {"stem", "head", "encoders.r256", "decoders.r256"}
    for old, new in ((m0, m1), (m1, m2)):
        old_ids = {id(p) for p in old.parameters()}
        fresh = {n for n, p in new.named_parameters() if id(p) not in old_ids}
        assert select_trainable(new, "new") == fresh


def test_phase_a_trains_only_new_layers_and_phase_b_everything(reg) -> None:
    spec = tiny_spec((64, 128, 256))
    _, _, model = grow_all(spec, reg)
    phase_a, phase_b = stage_phases(spec, reg, 2)
    assert (phase_a.trainable, phase_b.trainable) == ("new", "all")

    trainable = apply_phase(model, phase_a)
    loss(model).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(n.startswith("core.") for n in params(model))
    assert not any(n.startswith("core.") for n in trainable)
    # The zero-initialised head is the first layer a fresh stage learns through.
    assert model.head.proj.weight.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    assert apply_phase(model, phase_b) == set(params(model))
    loss(model).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_all_but_core_freezes_text_cond_and_core(reg) -> None:
    spec = tiny_spec((64, 128))
    _, model = grow_all(spec, reg)
    chosen = apply_phase(model, Phase("C", 10, trainable="all-but-core"))
    assert chosen and all(n.split(".")[0] not in CORE_MODULES for n in chosen)
    assert chosen | {n for n in params(model) if n.split(".")[0] in CORE_MODULES} == set(params(model))


def test_from_scratch_builds_a_fresh_model_every_stage(reg) -> None:
    spec = tiny_spec((64, 128), growth={"type": "from-scratch"})
    m0, m1 = grow_all(spec, reg)
    assert m0.topology()["kind"] == "unet" and m0.topology()["encoders"] == [64, 32]
    assert m1.new_modules == {"text", "cond", "core", "stem", "head"} | pairs(128, 64, 32)
    assert m1.core is not m0.core
    old_ids = {id(p) for p in m0.parameters()}
    assert not any(id(p) in old_ids for p in m1.parameters())
    name = "core.in_proj.weight"  # randomly initialised, so a fresh core differs
    assert not torch.equal(params(m1)[name], params(m0)[name])
    assert [p.name for p in stage_phases(spec, reg, 1)] == ["all"]


def test_replay_rebuilds_the_stepwise_topology(reg) -> None:
    spec = tiny_spec((64, 128, 256))
    stepwise = grow_all(spec, reg)
    for k, model in enumerate(stepwise):
        replayed = replay(spec, reg, k)
        assert replayed.topology() == model.topology()
        shapes = {n: p.shape for n, p in model.state_dict().items()}
        assert {n: p.shape for n, p in replayed.state_dict().items()} == shapes
        assert all(p.device.type == "cpu" for p in replayed.parameters())


def test_replay_then_load_reproduces_the_model(reg) -> None:
    spec = tiny_spec((64, 128))
    model = grow_all(spec, reg)[-1]
    with torch.no_grad():
        for p in model.head.parameters():  # a non-zero output, so the comparison means something
            p.normal_()
    replayed = replay(spec, reg, 1)
    replayed.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(forward(replayed), forward(model))


def test_same_seed_builds_identical_weights_whatever_the_global_rng(reg) -> None:
    spec = tiny_spec((64, 128))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = build_stage_model(spec, reg, 0)
    assert torch.equal(torch.get_rng_state(), state)  # building does not consume the caller's RNG
    torch.manual_seed(2)
    b = build_stage_model(spec, reg, 0)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = build_stage_model(tiny_spec((64, 128), seed=1), reg, 0)
    assert not torch.equal(c.state_dict()["core.in_proj.weight"], sa["core.in_proj.weight"])


def test_greedy_needs_the_previous_model(reg) -> None:
    spec = tiny_spec((64, 128, 256))
    with pytest.raises(ValueError, match="needs the stage 0 model"):
        build_stage_model(spec, reg, 1)
    m0 = build_stage_model(spec, reg, 0)
    with pytest.raises(ValueError, match="grows from the stage 1 model at 128"):
        build_stage_model(spec, reg, 2, prev=m0)
    with pytest.raises(ValueError, match="stage 3 does not exist"):
        build_stage_model(spec, reg, 3, prev=m0)


def test_phase_config_validation(reg) -> None:
    def parse(**config):
        return reg.parse("growth_policy", config)

    with pytest.raises(ValidationError, match="phase names must be unique within a stage; repeated: A"):
        parse(type="greedy", phases=[{"name": "A", "steps": 1}, {"name": "A", "steps": 9}])
    with pytest.raises(ValidationError, match="greater than 0"):
        parse(type="from-scratch", phases=[{"name": "A", "steps": 0}])
    with pytest.raises(ValidationError, match="at least one phase"):
        parse(type="greedy", phases=[])
    with pytest.raises(ValidationError, match="trainable"):
        parse(type="greedy", phases=[{"name": "A", "steps": 1, "trainable": "old"}])
    spec = tiny_spec((64,), growth={"type": "greedy", "phases": [{"name": "warm", "steps": 5, "lr_mult": 0.5}]})
    assert stage_phases(spec, reg, 0) == [Phase("warm", 5, 0.5, "all")]
