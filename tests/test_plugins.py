from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import Field

from vermeer_core.hookspecs import hookimpl
from vermeer_core.plugins import BUILTIN_PLUGINS, PluginError, get_plugins, load
from vermeer_core.registry import KINDS, ComponentConfig, Registry
from vermeer_core.spec import SpecError, parse_spec

BUILTINS = {name for name, _ in BUILTIN_PLUGINS}

GOOD_PLUGIN = """
from vermeer_core.hookspecs import hookimpl
from vermeer_core.registry import ComponentConfig

class MyGrowthConfig(ComponentConfig):
    speed: int = 3

class MyGrowth:
    def __init__(self, config):
        self.config = config

@hookimpl
def vermeer_register(registry):
    registry.add("growth_policy", "my-growth", MyGrowth, MyGrowthConfig)
"""


def test_builtins_register_from_the_explicit_tuple():
    plugins = load()
    assert BUILTINS <= set(plugins.origins)
    for name, module in BUILTIN_PLUGINS:
        assert plugins.origins[name][0] == "vermeer"
        assert plugins.manager.get_plugin(name).__name__ == module
    kinds = {c.kind for c in plugins.registry}
    assert kinds == set(KINDS)  # every kind has a built-in
    assert not plugins.failures


def test_entry_point_naming_a_builtin_module_is_skipped(fake_distribution):
    """An (older) install of vermeer itself listed the built-ins as entry points: they are
    already registered from the tuple, so they are neither loaded twice nor reported."""
    fake_distribution("vermeer-old", {"growth": "vermeer_plugins.growth", "other-name": "vermeer_plugins.samplers"}, {})
    plugins = load()
    assert not plugins.failures
    assert plugins.registry.names("growth_policy") == ["from-scratch", "greedy"]
    assert plugins.manager.get_plugin("other-name") is None


def test_third_party_with_a_builtin_name_does_not_hide_it(fake_distribution):
    fake_distribution("vermeer-shadow", {"growth": "fakeplug_shadow"}, {"fakeplug_shadow": GOOD_PLUGIN})
    with pytest.warns(RuntimeWarning, match="'growth'.*vermeer-shadow 1.2.3.*built-in plugin 'growth'"):
        plugins = load()
    [failure] = plugins.failures
    text = str(failure)
    # names both: the third party's entry point (and target) and the built-in it collides with
    assert "'growth' (distribution vermeer-shadow 1.2.3)" in text and "fakeplug_shadow" in text
    assert "vermeer_plugins.growth" in text and "another name" in text
    assert "greedy" in plugins.registry.names("growth_policy")  # the built-in still works
    assert "my-growth" not in plugins.registry.names("growth_policy")


def test_unknown_type_error_names_plugins_that_failed(fake_distribution):
    """The component a spec asks for may be in a plugin that did not load: say so."""
    fake_distribution("vermeer-broken", {"broken": "fakeplug_broken2"}, {"fakeplug_broken2": "import does_not_exist_xyz\n"})
    with pytest.warns(RuntimeWarning):
        plugins = load()
    data = yaml.safe_load((Path(__file__).parents[1] / "specs" / "quickstart.yaml").read_text())
    data["stages"][1]["growth"] = {"type": "my-growth"}
    with pytest.raises(SpecError) as info:
        parse_spec(data, plugins.registry, "t.yaml")
    [(path, msg)] = info.value.problems
    assert path == "stages.1.growth"
    assert msg.startswith("unknown type 'my-growth'; registered: 'from-scratch', 'greedy'")
    assert "plugins that failed to load" in msg and "'broken' (distribution vermeer-broken 1.2.3)" in msg
    assert "does_not_exist_xyz" in msg
    with pytest.raises(KeyError, match="failed to load.*'broken'"):
        plugins.registry.get("growth_policy", "my-growth")
    # with every plugin loading, the message carries no such note
    data["stages"][1]["growth"] = {"type": "nope"}
    with pytest.raises(SpecError) as info:
        parse_spec(data, load(autoload=False).registry, "t.yaml")
    assert "failed to load" not in str(info.value)


def test_third_party_plugin_from_distribution(fake_distribution):
    fake_distribution("vermeer-mygrowth", {"mygrowth": "fakeplug_good"}, {"fakeplug_good": GOOD_PLUGIN})
    plugins = load()
    comp = plugins.registry.get("growth_policy", "my-growth")
    assert comp.plugin == "mygrowth"
    assert plugins.origins["mygrowth"] == ("vermeer-mygrowth", "1.2.3")
    cfg = plugins.registry.parse("growth_policy", {"type": "my-growth", "speed": 5})
    assert plugins.registry.build(cfg, "growth_policy").config.speed == 5


def test_broken_plugin_is_reported_and_others_load(fake_distribution):
    fake_distribution("vermeer-broken", {"broken": "fakeplug_broken"}, {"fakeplug_broken": "import does_not_exist_xyz\n"})
    with pytest.warns(RuntimeWarning, match="broken"):
        plugins = load()
    assert len(plugins.failures) == 1
    text = str(plugins.failures[0])
    assert "'broken'" in text and "vermeer-broken 1.2.3" in text and "does_not_exist_xyz" in text
    assert "shallow-uvit" in plugins.registry.names("core")  # the others still loaded


def test_duplicate_names_rejected(fake_distribution):
    dup = GOOD_PLUGIN.replace('"my-growth"', '"greedy"')
    fake_distribution("vermeer-dup", {"dup": "fakeplug_dup"}, {"fakeplug_dup": dup})
    with pytest.raises(PluginError, match=r"growth_policy 'greedy' is registered twice.*'growth'.*'dup'"):
        load()


def test_disabled_plugins_env(monkeypatch, fake_distribution):
    fake_distribution("vermeer-mygrowth", {"mygrowth": "fakeplug_good2"}, {"fakeplug_good2": GOOD_PLUGIN})
    monkeypatch.setenv("VERMEER_DISABLED_PLUGINS", "mygrowth, samplers")
    plugins = load()
    assert "my-growth" not in plugins.registry.names("growth_policy")
    assert plugins.registry.names("sampler") == []
    assert "greedy" in plugins.registry.names("growth_policy")


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_autoload_switch_removes_third_parties_only(monkeypatch, fake_distribution, value):
    fake_distribution(f"vermeer-mygrowth{value}", {"mygrowth": f"fakeplug_auto{value}"},
                      {f"fakeplug_auto{value}": GOOD_PLUGIN})
    assert "my-growth" in load().registry.names("growth_policy")  # found while autoload is on
    monkeypatch.setenv("VERMEER_DISABLE_PLUGIN_AUTOLOAD", value)

    class Local:
        @hookimpl
        def vermeer_register(self, registry):
            registry.add("sampler", "local", lambda cfg: cfg)

    plugins = load(extra=[Local()])
    assert "my-growth" not in plugins.registry.names("growth_policy")  # the third party is off
    assert "mygrowth" not in plugins.origins
    assert {c.kind for c in plugins.registry} == set(KINDS)  # every built-in is still there
    assert "local" in plugins.registry.names("sampler")
    # no built-ins either: only what is passed explicitly
    only = load(extra=[Local()], builtins=False)
    assert [(c.kind, c.name) for c in only.registry] == [("sampler", "local")]


def test_extra_builtin_module_is_not_registered_twice():
    from vermeer_plugins import samplers

    plugins = load(extra=[samplers], autoload=False)
    assert plugins.registry.names("sampler") == ["ddim", "ddpm", "dpmpp-2m"]
    alone = load(extra=[samplers], autoload=False, builtins=False)
    assert {c.kind for c in alone.registry} == {"sampler"}


def test_unknown_hook_fails_loudly():
    class Misspelt:
        @hookimpl
        def vermeer_registr(self, registry):  # typo: no such hook
            pass

    with pytest.raises(PluginError, match="vermeer_registr"):
        load(extra=[Misspelt()], autoload=False)


def test_failing_register_names_plugin(fake_distribution):
    src = GOOD_PLUGIN.replace('registry.add("growth_policy"', 'raise RuntimeError("boom"); registry.add("growth_policy"')
    fake_distribution("vermeer-boom", {"boom": "fakeplug_boom"}, {"fakeplug_boom": src})
    with pytest.raises(PluginError, match=r"'boom' \(distribution vermeer-boom 1.2.3\).*boom"):
        load()


def test_registry_rules():
    reg = Registry()

    class Cfg(ComponentConfig):
        n: int = Field(1, gt=0)

    reg.add("sampler", "a", lambda c: ("a", c.n), Cfg)
    reg.add("sampler", "b", lambda c: ("b", c.n), Cfg)
    with pytest.raises(ValueError, match="unknown component kind 'samplr'"):
        reg.add("samplr", "x", lambda c: c)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("sampler", "a", lambda c: c, Cfg)

    class Typed(ComponentConfig):
        type: str = "x"

    with pytest.raises(ValueError, match="field named 'type'"):
        reg.add("sampler", "t", lambda c: c, Typed)
    assert reg.build(reg.parse("sampler", {"type": "b", "n": 4}), "sampler") == ("b", 4)
    with pytest.raises(KeyError, match="registered: a, b"):
        reg.get("sampler", "zzz")


def test_process_wide_plugins_cached():
    assert get_plugins() is get_plugins()


def test_every_hook_has_a_test():
    """datasette's meta-test: a hook added to hookspecs without a test of its own fails here."""
    from pathlib import Path

    from vermeer_core import hookspecs

    hooks = [n for n in dir(hookspecs) if n.startswith("vermeer_") and callable(getattr(hookspecs, n))]
    assert hooks, "no hooks found"
    here = Path(__file__).parent
    sources = "".join(p.read_text() for p in here.glob("test_*.py") if p.name != "test_plugins.py")
    sources += Path(__file__).read_text().split("def test_every_hook_has_a_test")[0]
    untested = [h for h in hooks if f"def {h}(" not in sources]
    assert not untested, f"hooks without a test implementing them: {untested}"
    for h in hooks:  # and every hookspec says when it is called
        assert (getattr(hookspecs, h).__doc__ or "").strip(), h
