"""Model assembly: VermeerModel, the conditioning, the builder, parameter groups, replay."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_model_spec import tiny_spec
from torch import nn

from vermeer_core.interfaces import Phase
from vermeer_core.model import (
    Conditioning,
    ModelBuilder,
    VermeerModel,
    apply_phase,
    build_stage_model,
    logsnr_fourier_features,
    param_groups,
    replay,
    select_trainable,
)
from vermeer_core.plugins import get_registry


@pytest.fixture(scope="module")
def reg():
    return get_registry()


@pytest.fixture(scope="module")
def spec():
    return tiny_spec((64, 128))


def text_and_noise(model: VermeerModel, batch: int = 2):
    r = model.resolution
    x = torch.randn(batch, 3, r, r, generator=torch.Generator().manual_seed(0))
    return x, model.encode_text(["a red circle", ""][:batch])


def test_fourier_features_are_bounded_and_distinguish_noise_levels() -> None:
    logsnr = torch.tensor([-20.0, -0.1, 0.0, 0.1, 20.0])
    f = logsnr_fourier_features(logsnr)
    assert f.shape == (5, 128) and f.abs().max() <= 1.0
    distances = torch.cdist(f, f)
    assert (distances + torch.eye(5)).min() > 0.05  # even nearby levels are told apart


def test_conditioning_mixes_noise_level_and_pooled_text() -> None:
    cond = Conditioning(cond_dim=12, text_dim=5)
    pooled = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    base = cond(torch.zeros(3), pooled)
    assert base.shape == (3, 12)
    assert not torch.allclose(cond(torch.full((3,), 4.0), pooled), base)
    assert not torch.allclose(cond(torch.zeros(3), pooled + 1), base)


def test_forward_routes_each_encoder_skip_to_its_decoder(reg, spec) -> None:
    model = build_stage_model(spec, reg, 1, prev=build_stage_model(spec, reg, 0))
    seen: dict[str, torch.Tensor] = {}
    for key, enc in model.encoders.items():
        enc.register_forward_hook(lambda m, args, out, key=key: seen.__setitem__(f"E{key}", out[0]))
    for key, dec in model.decoders.items():
        dec.register_forward_hook(lambda m, args, out, key=key: seen.__setitem__(f"D{key}", args[1]))
    x, text = text_and_noise(model)
    with torch.no_grad():
        out = model(x, torch.tensor([1.0, -3.0]), text)
    assert out.shape == x.shape
    for key in ("r128", "r64", "r32"):
        assert seen[f"D{key}"] is seen[f"E{key}"]
        assert seen[f"D{key}"].shape[-1] == int(key[1:])


def test_forward_rejects_the_wrong_resolution(reg, spec) -> None:
    model = build_stage_model(spec, reg, 0)
    with pytest.raises(ValueError, match="takes 64x64 images, got"):
        model(torch.zeros(1, 3, 128, 128), torch.zeros(1), model.encode_text(["x"]))


def test_scalar_logsnr_is_broadcast_over_the_batch(reg, spec) -> None:
    model = build_stage_model(spec, reg, 0)
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_()
        x, text = text_and_noise(model)
        assert torch.equal(model(x, torch.tensor(2.0), text), model(x, torch.full((2,), 2.0), text))


def test_parameter_groups_split_core_from_periphery(reg, spec) -> None:
    model = build_stage_model(spec, reg, 0)
    groups = param_groups(model)
    names = {n for n, _ in model.named_parameters()}
    assert set(groups["core"]) | set(groups["periphery"]) == names
    assert not set(groups["core"]) & set(groups["periphery"])
    assert {n.split(".")[0] for n in groups["core"]} == {"text", "cond", "core"}
    assert {n.split(".")[0] for n in groups["periphery"]} == {"stem", "shallow_in", "shallow_out", "head"}


def test_trainable_choices_and_errors(reg, spec) -> None:
    model = build_stage_model(spec, reg, 0)
    with pytest.raises(ValueError, match="unknown alias .some.; aliases: all, new, all-but-core"):
        select_trainable(model, "some")  # type: ignore[arg-type]
    model.new_modules = frozenset()
    with pytest.raises(ValueError, match="'new' matches no parameter of the 64x64 model, so it would train nothing"):
        apply_phase(model, Phase("A", 1, trainable="new"))


def test_parameters_a_component_froze_stay_frozen_through_growth(reg, spec, monkeypatch) -> None:
    """A text encoder that ships frozen (e.g. pretrained) is never unfrozen by a phase."""
    build_text = ModelBuilder.text_encoder

    def frozen_text(self: ModelBuilder) -> nn.Module:
        return build_text(self).requires_grad_(False)

    monkeypatch.setattr(ModelBuilder, "text_encoder", frozen_text)
    m0 = build_stage_model(spec, reg, 0)
    text_names = {f"text.{n}" for n, _ in m0.text.named_parameters()}
    assert text_names and m0.always_frozen == text_names
    apply_phase(m0, Phase("B", 1, trainable="all"))
    m1 = build_stage_model(spec, reg, 1, prev=m0)
    assert m1.always_frozen == text_names
    chosen = apply_phase(m1, Phase("B", 1, trainable="all"))
    assert not chosen & text_names
    assert not any(p.requires_grad for p in m1.text.parameters())


def test_builder_errors_name_the_fix(reg) -> None:
    spec = tiny_spec((64,))
    builder = ModelBuilder(spec, reg)
    with pytest.raises(ValueError, match="model.widths has no channel count for resolution 128"):
        builder.encoder(128)
    with pytest.raises(ValueError, match="is not grid\\*2\\^k"):
        builder.unet(96)


def test_model_checks_its_own_structure(reg, spec) -> None:
    model = build_stage_model(spec, reg, 0)
    parts = {k: getattr(model, k) for k in ("text", "cond", "core", "stem", "head")}
    with pytest.raises(ValueError, match="does not match grid 16"):
        VermeerModel(resolution=64, grid=16, stem_factor=1, **parts)


def test_replay_materialises_on_cpu_with_restorable_buffers(reg, spec, monkeypatch) -> None:
    """A component with a non-persistent buffer cannot go through meta + to_empty (the buffer
    would be garbage and no checkpoint restores it): replay builds it for real instead."""

    class WithTable(Conditioning):
        def __init__(self, cond_dim: int, text_dim: int) -> None:
            super().__init__(cond_dim, text_dim)
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    monkeypatch.setattr(ModelBuilder, "cond", lambda self, text_dim: WithTable(self.cond_dim, text_dim))
    model = replay(spec, reg, 1)
    assert torch.equal(model.cond.table, torch.arange(4.0))
    assert model.topology()["encoders"] == [128, 64, 32]


def test_context_is_frozen(reg, spec) -> None:
    from vermeer_core.model import growth_context

    ctx = growth_context(spec, reg, 1)
    assert (ctx.stage, ctx.resolution, ctx.prev_resolution) == (1, 128, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.stage = 2  # type: ignore[misc]


def test_replay_grows_on_the_meta_device(reg, spec, monkeypatch) -> None:
    """Replay must not pay for initialising every stage: it grows on meta, then materialises."""
    import vermeer_core.model as model_module

    devices: list[str] = []
    grow_to = model_module._grow_to

    def spy(*args, **kwargs):
        devices.append(torch.empty(()).device.type)
        return grow_to(*args, **kwargs)

    monkeypatch.setattr(model_module, "_grow_to", spy)
    model = replay(spec, reg, 1)
    assert devices == ["meta"]
    assert {p.device.type for p in model.parameters()} == {"cpu"}
