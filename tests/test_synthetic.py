"""dataset ``synthetic``: determinism, sharding, resume, rendering, captions, held-out scenes.

The checker that reads images back (metric ``alignment``) is tested in test_alignment.py."""

from __future__ import annotations


import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F

from vermeer_core.interfaces import DataStream
from vermeer_core.plugins import get_registry
from vermeer_plugins import synthetic as S
from vermeer_plugins.synthetic import (
    COLOURS,
    Item,
    Scene,
    SyntheticConfig,
    build_synthetic,
    caption,
    eval_scene,
    render,
    scene,
)

MIXED = SyntheticConfig(max_objects=3, background="gradient")
GREY = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def stream(config: SyntheticConfig = MIXED, **kw: int) -> S.SyntheticStream:
    args = {"resolution": 32, "batch_size": 4, "rank": 0, "world_size": 1, "seed": 7} | kw
    return build_synthetic(config, **args)


def take(s: S.SyntheticStream, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` batches of ``s``, concatenated."""
    it = iter(s)
    batches = [next(it) for _ in range(n)]
    return torch.cat([b.images for b in batches]), [c for b in batches for c in b.captions]


def test_scene_is_a_pure_function_of_seed_and_index() -> None:
    assert scene(3, 11, MIXED) == scene(3, 11, MIXED)
    assert len({caption(scene(3, i, MIXED)) for i in range(20)}) > 10
    assert scene(3, 11, MIXED) != scene(4, 11, MIXED)
    with pytest.raises(ValueError, match=">= 0"):
        scene(-1, 0)


def test_batches_do_not_depend_on_batch_size() -> None:
    small, small_caps = take(stream(batch_size=3), 2)
    big, big_caps = take(stream(batch_size=6), 1)
    assert torch.equal(small, big) and small_caps == big_caps


def test_ranks_of_world_two_partition_world_one() -> None:
    whole, caps = take(stream(batch_size=8), 1)
    r0, caps0 = take(stream(rank=0, world_size=2), 1)
    r1, caps1 = take(stream(rank=1, world_size=2), 1)
    assert torch.equal(whole[0::2], r0) and torch.equal(whole[1::2], r1)
    assert caps[0::2] == caps0 and caps[1::2] == caps1
    # No sample twice: every image of the two ranks together is distinct.
    both = torch.cat([r0, r1]).flatten(1)
    assert len({tuple(row.tolist()) for row in both}) == 8


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_gives_the_next_batch(rank: int) -> None:
    first = stream(rank=rank, world_size=2)
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    assert state == {"next_index": 16 + rank}
    expected = next(it)
    resumed = stream(rank=rank, world_size=2)
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert torch.equal(got.images, expected.images) and got.captions == expected.captions


def test_resume_under_another_world_size_starts_at_or_after_the_saved_index() -> None:
    s = stream(rank=1, world_size=3)
    s.load_state_dict({"next_index": 8})  # this rank's indices are 1, 4, 7, 10, ...
    assert s.state_dict() == {"next_index": 10}
    with pytest.raises(ValueError, match="next_index"):
        s.load_state_dict({"next_index": -1})


def test_finite_n_repeats_and_seed_offset_changes_scenes() -> None:
    images, caps = take(stream(SyntheticConfig(n=3), batch_size=6), 1)
    assert torch.equal(images[:3], images[3:]) and caps[:3] == caps[3:]
    plain, _ = take(stream(), 1)
    shifted, _ = take(stream(SyntheticConfig(max_objects=3, background="gradient", seed_offset=1)), 1)
    assert not torch.equal(plain, shifted)


def test_stream_contract_range_and_errors() -> None:
    s = stream(resolution=48, batch_size=5)
    assert isinstance(s, DataStream)
    batch = next(iter(s))
    assert batch.images.shape == (5, 3, 48, 48) and batch.images.dtype == torch.float32
    assert batch.images.min() >= -1 and batch.images.max() <= 1 and len(batch.captions) == 5
    with pytest.raises(ValueError, match="rank"):
        stream(rank=2, world_size=2)
    with pytest.raises(pydantic.ValidationError):
        SyntheticConfig(max_objects=4)


@pytest.mark.parametrize("res", [128, 1024])
def test_render_is_consistent_across_resolutions(res: int) -> None:
    s = scene(0, 0, MIXED)  # three objects, one of each shape
    ref = torch.from_numpy(render(s, 64))
    down = F.avg_pool2d(torch.from_numpy(render(s, res))[None], res // 64)[0]
    diff = (down - ref).abs()
    # Only anti-aliased edge pixels may differ, and not by much.
    assert diff.mean() < 0.005 and diff.max() < 0.35
    small = torch.from_numpy(render(s, 32))
    assert (F.avg_pool2d(ref[None], 2)[0] - small).abs().mean() < 0.005


def test_render_draws_each_object_in_its_colour_at_its_place() -> None:
    s = scene(0, 5, MIXED)
    image = render(s, 256)
    assert image.dtype == np.float32 and image.shape == (3, 256, 256)
    for it in s.items:
        px = image[:, int(it.y * 256), int(it.x * 256)]
        np.testing.assert_allclose((px + 1) / 2, COLOURS[it.colour], atol=1e-6)
    plain = Scene((Item("square", "red", "small", 0.5, 0.5, 0.1),), "single", None, GREY, 0.0)
    np.testing.assert_allclose(render(plain, 16)[:, 0, 0], 0.0, atol=1e-6)  # grey 0.5 -> 0


def test_captions_of_hand_checked_scenes() -> None:
    # Checked by eye against the rendered images (seed 0, max_objects=3, gradient).
    expected = {
        0: "a large yellow circle, a large red triangle and a large green square",
        1: "a large purple circle below a small yellow triangle",
        4: "two small pink triangles",
        6: "two large green triangles",
    }
    for index, text in expected.items():
        assert caption(scene(0, index, MIXED)) == text
    a = Item("circle", "red", "small", 0.5, 0.2, 0.08)
    b = Item("square", "blue", "large", 0.5, 0.7, 0.18)
    text = caption(Scene((a, b), "relation", "above", GREY, 0.0))
    assert text == "a small red circle above a large blue square"
    assert caption(Scene((b,), "single", None, GREY, 0.0)) == "a large blue square"


def test_layouts_agree_with_their_captions() -> None:
    seen = set()
    for index in range(60):
        s = scene(1, index, MIXED)
        seen.add(s.layout)
        if s.layout == "count":
            assert len({(it.shape, it.colour, it.size) for it in s.items}) == 1
        else:
            assert len({it.colour for it in s.items}) == len(s.items)
        if s.layout == "relation":
            a, b = s.items
            dx, dy = b.x - a.x, b.y - a.y
            ruling = {"above": dy, "below": -dy, "left of": dx, "right of": -dx}[s.relation]
            assert ruling > max(abs(dx), abs(dy)) - 1e-9 and ruling > 0
        for it in s.items:  # inside the image
            assert it.r <= it.x <= 1 - it.r and it.r <= it.y <= 1 - it.r
    assert seen == {"single", "list", "count", "relation"}
    assert all(len(scene(1, i, SyntheticConfig(max_objects=1)).items) == 1 for i in range(10))
    assert all(scene(1, i, SyntheticConfig(relations=False)).layout != "relation" for i in range(30))


def test_registry_builds_synthetic() -> None:
    reg = get_registry()
    assert "synthetic" in reg.names("dataset")
    cfg = reg.parse("dataset", {"type": "synthetic", "max_objects": 1})
    s = reg.build(cfg, "dataset", resolution=16, batch_size=2, rank=0, world_size=1, seed=0)
    assert next(iter(s)).images.shape == (2, 3, 16, 16)
    with pytest.raises(pydantic.ValidationError):
        reg.parse("dataset", {"type": "synthetic", "colours": 3})


def test_eval_prompts_are_held_out_and_follow_the_config() -> None:
    cfg = SyntheticConfig(max_objects=2)
    s = stream(cfg, seed=0)
    prompts = s.eval_prompts(300, seed=0)
    assert prompts == s.eval_prompts(300, seed=0)  # deterministic
    assert prompts[:5] == stream(cfg, seed=9, rank=1, world_size=2).eval_prompts(5, seed=0)  # not per rank/run
    assert prompts[:5] != s.eval_prompts(5, seed=1)
    # held out: none of the first 3000 training scenes of the same seed is an eval scene, while
    # the eval scenes follow the same distribution (every layout, the config's object count)
    train = {scene(0, i, cfg) for i in range(3000)}
    assert not train & {p.scene for p in prompts}
    assert all(p.scene == eval_scene(0, i, cfg) and p.caption == caption(p.scene) for i, p in enumerate(prompts))
    assert {p.scene.layout for p in prompts} == {"single", "list", "count", "relation"}
    assert max(len(p.scene.items) for p in prompts) == 2
    refs = s.eval_references(prompts[:3], 16)
    assert refs.shape == (3, 3, 16, 16)
    assert torch.equal(refs[1], torch.from_numpy(render(prompts[1].scene, 16)))
