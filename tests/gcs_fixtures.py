"""Fixtures for tests that talk to GCS (load with ``pytest_plugins = ["gcs_fixtures"]``):
``gcs_emulator`` (one fake-gcs-server per session) and ``gcs`` (a fresh bucket per test, with
this process and its subprocesses pointed at the emulator). Helpers: tests/gcs.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from gcs import GCS, GCSEmulator, use_endpoint

__all__ = ["gcs", "gcs_emulator"]


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GCSEmulator]:
    emulator = GCSEmulator()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def gcs(gcs_emulator: GCSEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[GCS]:
    """A fresh bucket, with this process and its subprocesses pointed at the emulator."""
    import gcsfs

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    gcs_emulator.create_bucket(bucket)
    env = use_endpoint(monkeypatch, gcs_emulator.url)
    yield GCS(gcs_emulator, bucket, env)
    gcsfs.GCSFileSystem.clear_instance_cache()
