from __future__ import annotations

import os

# gcsfs 2026.10 otherwise attempts a gRPC bucket-type lookup against the emulator on every call
# (see ../shared/ENVIRONMENT.md); must be set before gcsfs is imported anywhere.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import sys
import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """Install a fake distribution on sys.path: ``make(name, {ep_name: "module:attr"}, {module: source})``.

    importlib.metadata discovers ``<name>-<version>.dist-info`` folders on sys.path, which is
    exactly how an installed third-party plugin package is found.
    """

    def make(name: str, entry_points: dict[str, str], modules: dict[str, str], version: str = "1.2.3") -> Path:
        root = tmp_path / f"site-{name}"
        root.mkdir()
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        eps = "[vermeer]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(eps)
        for mod, src in modules.items():
            (root / f"{mod}.py").write_text(textwrap.dedent(src))
        monkeypatch.syspath_prepend(str(root))
        return root

    yield make
    for mod in [m for m in sys.modules if m.startswith("fakeplug_")]:
        del sys.modules[mod]
