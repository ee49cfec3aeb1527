"""The out-of-tree example plugin (examples/fade-in-growth) as a user meets it: pip-installed
(offline, no build isolation, into a temporary target), found through its entry point,
selected by ``type: fade-in`` in a spec, trained by a real ``vermeer run``, and passing the
growth-policy contract of :mod:`vermeer_core.testing`."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from engine_spec import ROOT, cli_env

from vermeer_core.plugins import load
from vermeer_core.testing import check_growth_policy, consolidate, read_metrics, tiny_spec_data

EXAMPLE = ROOT / "examples" / "fade-in-growth"
GROWTH = {"type": "fade-in", "phases": [{"name": "fade", "steps": 2}, {"name": "stable", "steps": 1}]}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install --no-deps --no-build-isolation --no-index`` of a copy of the example (so
    the build writes nothing into the repository) into a fresh target directory."""
    tmp = tmp_path_factory.mktemp("fadein")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    target = tmp / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (target / "vermeer_fadein" / "__init__.py").exists()
    return target


@pytest.fixture
def on_path(site: Path) -> Iterator[Path]:
    """The installed example importable in this process, for the duration of a test."""
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        for name in [m for m in sys.modules if m == "vermeer_fadein" or m.startswith("vermeer_fadein.")]:
            del sys.modules[name]


def _env(site: Path) -> dict[str, str]:
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_installed_plugin_is_found_by_its_entry_point(site: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "vermeer_core", "plugins", "--json"], capture_output=True,
                       text=True, env=_env(site), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rows = [c for c in out["components"] if c["name"] == "fade-in"]
    assert rows == [{"kind": "growth_policy", "name": "fade-in", "plugin": "fade-in",
                     "distribution": "vermeer-fadein", "version": "0.1.0"}]
    assert out["failures"] == []


def test_vermeer_run_trains_a_fade_in_spec(site: Path, tmp_path: Path) -> None:
    spec = tmp_path / "fade.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_data(GROWTH, checkpoint_every=100)))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "vermeer_core", "run", str(spec), "--out", str(out)],
                       capture_output=True, text=True, env=_env(site), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    records = read_metrics(out)
    assert [(r["step"], r["stage"], r["phase"]) for r in records] == [
        (1, 0, "fade"), (2, 0, "fade"), (3, 0, "stable"), (4, 1, "fade"), (5, 1, "fade"), (6, 1, "stable")]
    final = consolidate(out / "checkpoints" / "step-00000006", tmp_path)["model"]
    assert float(final["fade_alpha"]) == 1.0  # the fade completed: the new stage alone
    stage0 = consolidate(out / "checkpoints" / "step-00000003", tmp_path)["model"]
    assert "fade_alpha" not in stage0  # stage 0 is a plain U-Net
    # the previous resolution's path: the stage-0 stem and head, under new names
    for new, old in (("fade_stem.", "stem."), ("fade_head.", "head.")):
        suffixes = {k[len(new):] for k in final if k.startswith(new)}
        assert suffixes and suffixes == {k[len(old):] for k in stage0 if k.startswith(old)}


def test_example_passes_the_growth_policy_contract(on_path: Path, tmp_path: Path) -> None:
    plugins = load()
    assert plugins.origins["fade-in"] == ("vermeer-fadein", "0.1.0")
    check_growth_policy(GROWTH, tmp_path, plugins=plugins)


@pytest.mark.slow
def test_example_project_test_suite_passes(site: Path, tmp_path: Path) -> None:
    """The example's own tests (unit tests + the contract through the pytest11 plugin), run as
    its author would: pytest in the project's directory."""
    src = tmp_path / "project"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], capture_output=True,
                       text=True, env=_env(site), cwd=src, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "7 passed" in r.stdout


def test_example_imports_only_the_public_api() -> None:
    """A third party's view: the plugin package uses ``vermeer_core.api`` and nothing else."""
    import ast

    tree = ast.parse((EXAMPLE / "vermeer_fadein" / "__init__.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in modules if m.startswith("vermeer")} == {"vermeer_core.api"}
