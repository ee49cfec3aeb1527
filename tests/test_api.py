"""``vermeer_core.api`` is the one public plugin module: it exports what it says, built-in
plugins import nothing else from vermeer_core, and each kind's factory Protocol describes what
the built-ins actually return."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vermeer_core.api as api
from vermeer_core.plugins import get_registry

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def test_every_exported_name_exists() -> None:
    missing = [n for n in api.__all__ if not hasattr(api, n)]
    assert not missing
    for name in ("hookimpl", "ComponentConfig", "Registry", "PhaseConfig", "Phase", "GrowthContext",
                 "VermeerModel", "ModelBuilder", "Transfer", "TransferMap", "TextEmbedding", "Batch", "RunSpec",
                 "CoreFactory", "BlockFactory", "TextEncoderFactory", "AttentionFactory", "DatasetFactory",
                 "NoiseScheduleFactory", "SamplerFactory", "GrowthPolicyFactory"):
        assert name in api.__all__, name


def _vermeer_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vermeer_core"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("vermeer_core")]
    return found


@pytest.mark.parametrize("path", sorted(PLUGINS.glob("*.py")), ids=lambda p: p.name)
def test_builtin_plugins_import_only_the_public_api(path: Path) -> None:
    assert set(_vermeer_imports(path)) <= {"vermeer_core.api"}, path.name


def test_builtin_factories_return_what_their_protocols_say() -> None:
    reg = get_registry()
    returns = {"block": api.BlockFamily, "noise_schedule": api.NoiseSchedule, "sampler": api.Sampler,
               "growth_policy": api.GrowthPolicy}
    for kind, proto in returns.items():
        for name in reg.names(kind):
            obj = reg.build(reg.parse(kind, {"type": name}), kind)
            assert isinstance(obj, proto), (kind, name)
    data = reg.build(reg.parse("dataset", {"type": "synthetic"}), "dataset", resolution=8, batch_size=2, rank=0,
                     world_size=1, seed=0)
    assert isinstance(data, api.DataStream)
    batch = next(iter(data))
    assert isinstance(batch, api.Batch) and batch.images.shape == (2, 3, 8, 8)
