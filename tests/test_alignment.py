"""metric ``alignment``: the checker reads ground truth back at every resolution, scores noise
and mismatched prompts near chance, names what fails, and reports per proposition kind.

Measured on 64 held-out scenes (quickstart config, max_objects=2 / full config, max_objects=3
with gradients), ground truth / uniform noise / prompts of another scene: 32 px 1.0 / 0.007 /
0.075 (full: 1.0 / 0.009 / 0.084); 64, 128 and 256 px 1.0 / 0.0 / 0.075 (full: 0.084).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vermeer_core.interfaces import EvalPrompt, Metric
from vermeer_core.plugins import get_registry
from vermeer_plugins.alignment import KINDS, check, score
from vermeer_plugins.synthetic import Item, Scene, SyntheticConfig, caption, eval_scene, render

QUICK = SyntheticConfig(max_objects=2)
FULL = SyntheticConfig(max_objects=3, background="gradient")
GREY = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def failing(image: np.ndarray | torch.Tensor, claimed: Scene) -> list[str]:
    """The propositions of ``claimed`` that ``image`` does not satisfy."""
    return [p.text for p in check(image, claimed) if not p.ok]


@pytest.mark.parametrize(("res", "n"), [(32, 48), (64, 32), (128, 12), (256, 4)])
@pytest.mark.parametrize("cfg", [QUICK, FULL], ids=["quickstart", "full"])
def test_ground_truth_scores_at_least_0_99_at_every_resolution(res: int, n: int, cfg: SyntheticConfig) -> None:
    scenes = [eval_scene(1234, i, cfg) for i in range(n)]
    scores = [score(render(s, res), s) for s in scenes]
    assert np.mean(scores) >= 0.99, scores


@pytest.mark.parametrize("res", [32, 128])
def test_noise_and_mismatched_prompts_score_near_chance(res: int) -> None:
    scenes = [eval_scene(1234, i, FULL) for i in range(24)]
    g = torch.Generator().manual_seed(0)
    noise = [score(torch.rand(3, res, res, generator=g) * 2 - 1, s) for s in scenes]
    mismatched = [score(render(scenes[(i + 1) % 24], res), s) for i, s in enumerate(scenes)]
    assert np.mean(noise) < 0.05
    assert np.mean(mismatched) < 0.2
    blank = np.zeros((3, res, res), dtype=np.float32)
    assert score(blank, scenes[0]) == 0.0


def test_checker_names_the_proposition_that_fails() -> None:
    a = Item("circle", "red", "small", 0.3, 0.25, 0.09)
    b = Item("square", "blue", "large", 0.6, 0.7, 0.18)
    s = Scene((a, b), "relation", "above", GREY, 0.0)
    image = torch.from_numpy(render(s, 64))
    assert score(image, s) == 1.0
    assert [p.kind for p in check(image, s)] == ["colour", "shape", "size"] * 2 + ["relation"]

    flipped = dataclasses.replace(s, relation="below")
    assert failing(image, flipped) == ["the red thing is below the blue thing"]
    reshaped = dataclasses.replace(s, items=(dataclasses.replace(a, shape="triangle"), b))
    assert failing(image, reshaped) == ["the red thing is a triangle", "the red triangle is small"]
    shrunk = dataclasses.replace(s, items=(a, dataclasses.replace(b, size="small")))
    assert failing(image, shrunk) == ["the blue square is small"]
    pair = Scene((a, dataclasses.replace(a, x=0.7)), "count", None, GREY, 0.0)
    triple = Scene((a, a, a), "count", None, GREY, 0.0)
    two = render(pair, 64)
    assert score(two, pair) == 1.0 and failing(two, triple) == ["there are exactly 3 small red circles"]
    with pytest.raises(ValueError, match="square"):
        check(np.zeros((3, 8, 9), dtype=np.float32), s)


def test_metric_reports_overall_and_per_kind() -> None:
    reg = get_registry()
    metric = reg.build(reg.parse("metric", {"type": "alignment"}), "metric", device=torch.device("cpu"))
    assert isinstance(metric, Metric) and not metric.needs_references
    a = Item("circle", "red", "small", 0.3, 0.25, 0.09)
    b = Item("square", "blue", "large", 0.6, 0.7, 0.18)
    s = Scene((a, b), "relation", "above", GREY, 0.0)
    flipped = dataclasses.replace(s, relation="below")
    image = torch.from_numpy(render(s, 64))
    prompts = [EvalPrompt(caption(s), s), EvalPrompt(caption(flipped), flipped)]
    assert metric.update(torch.stack([image, image]), prompts) == [1.0, 6 / 7]
    out = metric.compute()
    assert out["alignment"] == pytest.approx((1 + 6 / 7) / 2)
    assert out["alignment/all"] == 0.5
    assert out["alignment/relation"] == 0.5
    assert out["alignment/colour"] == out["alignment/shape"] == out["alignment/size"] == 1.0
    assert "alignment/count" not in out  # no prompt states a count
    assert set(k.split("/")[-1] for k in out) <= {"alignment", "all", *KINDS}
    metric.reset()
    with pytest.raises(ValueError, match="no images"):
        metric.compute()
    with pytest.raises(ValueError, match="no synthetic scene"):
        metric.update(image[None], [EvalPrompt("a red circle")])
