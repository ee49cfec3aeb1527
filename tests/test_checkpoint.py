"""Checkpointer: commit markers, the `latest` pointer, pruning, crash debris; on a local disk and
on fsspec's ``memory://``. (Kills at each fault point of a real save: tests/test_resume.py.)"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from vermeer_core.checkpoint import MARKER, Checkpointer
from vermeer_core.inference import InferenceError, resolve_checkpoint
from vermeer_core.io import join

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(params=["file", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "file":
        yield str(tmp_path / "run")
        return
    url = f"memory://ckpt-test-{uuid.uuid4().hex}"
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def _state(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.full((3, 2), value), "b": torch.arange(4.0) + value}}


def _save(ck: Checkpointer, step: int, value: float) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "no process group, assuming a single process"
        # "spec" and "stage": what resolve_checkpoint (inference) requires of meta.json to call a checkpoint usable
        return ck.save(step, _state(value), {"step": step, "spec": {}, "stage": 0}, {"data": {"next_index": step * 10}})


def _names(ck: Checkpointer) -> list[str]:
    return [name for _, name in ck._list_steps()]


def test_save_commit_latest_and_load(root: str) -> None:
    ck = Checkpointer(root, keep=2)
    assert ck.latest() is None and ck.committed() == []
    url = _save(ck, 3, 1.0)
    assert url == join(root, "checkpoints", "step-00000003")
    _save(ck, 5, 2.0)
    fs, path = fsspec.core.url_to_fs(join(root, "checkpoints"))
    assert ck.latest() == join(root, "checkpoints", "step-00000005")
    assert fs.cat_file(f"{path}/latest").decode().strip() == "step-00000005"
    assert fs.exists(f"{path}/step-00000005/{MARKER}")
    assert ck.read_meta(ck.latest()) == {"step": 5, "spec": {}, "stage": 0}
    assert ck.read_rank_state(ck.latest(), 0) == {"data": {"next_index": 50}}
    assert ck.read_rank_state(ck.latest(), 1) is None
    target = _state(0.0)
    ck.load(ck.latest(), target)
    for k, v in _state(2.0)["model"].items():
        assert torch.equal(target["model"][k], v)


def test_keep_prunes_oldest(root: str) -> None:
    ck = Checkpointer(root, keep=3)
    for step in range(1, 7):
        _save(ck, step, float(step))
    assert _names(ck) == ["step-00000004", "step-00000005", "step-00000006"]
    assert [u.rsplit("/", 1)[1] for u in ck.committed()] == _names(ck)


def test_uncommitted_dir_is_never_latest_and_is_cleaned_up(root: str) -> None:
    ck = Checkpointer(root, keep=2)
    _save(ck, 2, 1.0)
    _save(ck, 4, 2.0)
    fs, path = fsspec.core.url_to_fs(join(root, "checkpoints"))
    fs.rm(f"{path}/step-00000004/{MARKER}")  # as if killed between shards and marker
    fs.makedirs(f"{path}/step-00000009", exist_ok=True)  # as if killed mid-write, a newer step
    fs.pipe(f"{path}/step-00000009/junk", b"partial")
    assert ck.latest() == join(root, "checkpoints", "step-00000002")
    assert [u.rsplit("/", 1)[1] for u in ck.committed()] == ["step-00000002"]
    with pytest.raises(InferenceError, match="uncommitted"):
        resolve_checkpoint(join(root, "checkpoints", "step-00000004"))
    # the next save over an uncommitted step replaces it; pruning removes the other debris
    _save(ck, 4, 3.0)
    assert _names(ck) == ["step-00000002", "step-00000004"]
    target = _state(0.0)
    ck.load(ck.latest(), target)
    assert torch.equal(target["model"]["w"], _state(3.0)["model"]["w"])


def test_latest_pointer_is_a_hint_markers_decide(root: str) -> None:
    """Killed after the marker, before the pointer moved: the newer committed one wins."""
    ck = Checkpointer(root, keep=2)
    _save(ck, 2, 1.0)
    _save(ck, 4, 2.0)
    fs, path = fsspec.core.url_to_fs(join(root, "checkpoints"))
    fs.pipe(f"{path}/latest", b"step-00000002\n")
    assert ck.latest() == join(root, "checkpoints", "step-00000004")
    assert resolve_checkpoint(root) == ck.latest()
