from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from vermeer_core.plugins import get_registry
from vermeer_core.spec import SpecError, apply_overrides, dump_spec, load_spec, parse_spec, spec_hash

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").rglob("*.yaml"))  # specs/paper/ included


def quickstart() -> dict:
    return yaml.safe_load((ROOT / "specs" / "quickstart.yaml").read_text())


def problems(data: dict) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(data, get_registry(), "t.yaml")
    return info.value.problems


@pytest.mark.parametrize("path", SPECS, ids=[str(p.relative_to(ROOT / "specs")) for p in SPECS])
def test_every_shipped_spec_validates(path):
    spec = load_spec(path, get_registry())
    res = [s.resolution for s in spec.stages]
    assert res == sorted(set(res))  # stages grow (a from-scratch baseline may have one)


def test_shipped_specs_exist():
    names = {p.name for p in SPECS}
    assert {"quickstart.yaml", "grow_1024.yaml"} <= names


def test_grow_1024_shape():
    spec = load_spec(ROOT / "specs" / "grow_1024.yaml", get_registry())
    assert [s.resolution for s in spec.stages] == [64, 128, 256, 512, 1024]
    assert spec.model.grid == 16


def test_component_configs_are_resolved():
    spec = parse_spec(quickstart(), get_registry())
    assert spec.model.core.type == "shallow-uvit" and spec.model.core.width == 128
    assert spec.stages[1].growth.phases[0].trainable == "new"
    with pytest.raises(ValidationError):
        spec.seed = 3  # frozen


def test_unknown_type_lists_registered_names():
    data = quickstart()
    data["stages"][1]["growth"]["type"] = "greedyy"
    [(path, msg)] = problems(data)
    assert path == "stages.1.growth"
    assert "greedyy" in msg and "'greedy'" in msg and "'from-scratch'" in msg


def test_error_path_has_no_union_tag():
    data = quickstart()
    data["stages"][1]["growth"]["phases"][0]["steps"] = 0
    [(path, msg)] = problems(data)
    assert path == "stages.1.growth.phases.0.steps"
    assert msg == "Input should be greater than 0"


def test_resolution_not_grid_power_of_two_names_stage():
    data = quickstart()
    data["stages"][1]["resolution"] = 96
    probs = problems(data)
    assert any(p == "stages.1.resolution" and "not grid*2^k" in m for p, m in probs)


def test_resolutions_must_increase():
    data = quickstart()
    data["stages"][1]["resolution"] = 32
    probs = problems(data)
    assert ("stages.1.resolution", "32 must be larger than the previous stage's 32") in probs


def test_widths_must_cover_every_resolution():
    data = quickstart()
    del data["model"]["widths"][64]
    data["model"]["widths"][256] = 8
    probs = problems(data)
    assert any(p == "model.widths" and "missing channels for resolution(s) [64]" in m for p, m in probs)
    assert any(p == "model.widths" and "[256] are not used by any stage" in m for p, m in probs)


def test_unknown_field_rejected():
    data = quickstart()
    data["model"]["core"]["widht"] = 3
    [(path, msg)] = problems(data)
    assert path == "model.core.widht" and "Extra inputs are not permitted" in msg


@pytest.mark.parametrize(
    ("where", "typo", "suggested"),
    [
        (("model", "core"), "widht", "width"),  # inside a registered component (a union member)
        (("optim",), "weight_decy", "weight_decay"),
        (("ema",), "decayy", "decay"),  # an optional section
        (("stages", 1, "growth"), "phasez", "phases"),  # a list item's component
        (("train",), "log_evry", "log_every"),
    ],
)
def test_typo_suggests_the_close_field(where, typo, suggested):
    data = quickstart()
    node = data
    for key in where:
        node = node[key]
    node[typo] = 1
    [(path, msg)] = problems(data)
    assert path == ".".join(map(str, (*where, typo)))
    assert msg.endswith(f"did you mean {suggested!r}?"), msg


def test_far_off_key_gets_no_suggestion():
    data = quickstart()
    data["optim"]["zzzzzz"] = 1
    [(path, msg)] = problems(data)
    assert path == "optim.zzzzzz" and "did you mean" not in msg


def test_overrides():
    data = apply_overrides(quickstart(), ["stages.0.batch_size=4", "model.core.depth=2", "sampling.prompts=[a, b]",
                                          "name=other"])
    spec = parse_spec(data, get_registry())
    assert spec.stages[0].batch_size == 4 and spec.model.core.depth == 2
    assert spec.sampling.prompts == ["a", "b"] and spec.name == "other"
    with pytest.raises(SpecError, match="no list item '7'"):
        apply_overrides(quickstart(), ["stages.7.batch_size=4"])
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        apply_overrides(quickstart(), ["stages.0.batch_size"])


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {grid: 16\nstages: []\n")
    with pytest.raises(SpecError, match=r"YAML syntax error at line \d+, column \d+"):
        load_spec(bad, get_registry())


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml", get_registry())


def test_lock_round_trip_and_hash():
    spec = parse_spec(quickstart(), get_registry())
    again = parse_spec(yaml.safe_load(dump_spec(spec)), get_registry())
    assert again == spec and spec_hash(again) == spec_hash(spec)
    other = parse_spec(apply_overrides(quickstart(), ["seed=1"]), get_registry())
    assert spec_hash(other) != spec_hash(spec)


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_sample_prompts_of_synthetic_specs_are_captions_the_data_can_produce(path):
    """A prompt asking for a word the dataset never shows (e.g. a "white" triangle) cannot
    follow its caption; every prompt's words must appear in the data configuration's captions,
    and it may name no more objects than a scene holds."""
    from vermeer_plugins import synthetic as S

    spec = load_spec(path, get_registry())
    if spec.data.type != "synthetic":
        pytest.skip("not a synthetic-data spec")
    captions = [S.caption(S.scene(1, i, spec.data)) for i in range(2000)]
    vocab = {w for c in captions for w in c.replace(",", " ").split()}
    for prompt in spec.sampling.prompts:
        unknown = set(prompt.replace(",", " ").split()) - vocab
        assert not unknown, f"{path.name}: prompt {prompt!r} uses {sorted(unknown)}, never in its data"
        objects = prompt.split().count("a") + sum(prompt.split().count(w) for w in ("two", "three")) * 2
        assert objects <= spec.data.max_objects, f"{path.name}: {prompt!r} names more objects than a scene holds"
