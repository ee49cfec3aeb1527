"""pytest plugin for ``pytest benchmarks``: devices, result collection, JSON file, summary table.

Benchmarks record rows through the ``bench`` fixture: ``bench.record(group, name, ms=...,
baseline=..., **metrics)``. Rows of one group are variants of the same work measured in the
same run; at the end of the session every row with a time gets ``time_vs_fastest`` (its time
over the group's fastest) and, where the group has a baseline row, ``time_vs_baseline``. All
rows, the machine description and the command go to ``benchmarks/results/<timestamp>.json``
(``--bench-out`` to change the folder), and a table is printed. Speed is reported, never
asserted.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

# The helpers sit beside this file; pytest's default import mode puts this folder on sys.path,
# other modes (--import-mode=importlib) do not.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine_info  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_STATE = pytest.StashKey["BenchSession"]()


@dataclass
class BenchSession:
    """Everything measured in one ``pytest benchmarks`` session."""

    started: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None

    def record(self, group: str, name: str, *, ms: float | None = None, baseline: bool = False, **metrics: Any) -> None:
        """One measured variant ``name`` of ``group``; ``baseline`` marks the group's reference."""
        self.rows.append({"group": group, "name": name, "ms": ms, "baseline": baseline, **metrics})

    def finalize(self) -> None:
        """Add ``time_vs_fastest`` / ``time_vs_baseline`` to every timed row of every group."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in self.rows:
            groups.setdefault(row["group"], []).append(row)
        for rows in groups.values():
            timed = [r for r in rows if isinstance(r.get("ms"), (int, float)) and r["ms"] > 0]
            if not timed:
                continue
            fastest = min(r["ms"] for r in timed)
            base = next((r["ms"] for r in timed if r["baseline"]), None)
            for r in timed:
                r["time_vs_fastest"] = r["ms"] / fastest
                if base is not None:
                    r["time_vs_baseline"] = r["ms"] / base


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vermeer benchmarks")
    group.addoption(
        "--bench-device", default="auto", choices=("auto", "cpu", "cuda", "all"),
        help="where to run: auto = cuda if available else cpu; all = cpu and cuda (if available)",
    )
    group.addoption("--bench-out", default=str(RESULTS_DIR), help="folder for the results JSON file")
    group.addoption(
        "--bench-compile", action="store_true",
        help="also time torch.compile'd training steps on CUDA (adds about a minute of compilation)",
    )


def _devices(config: pytest.Config) -> list[str]:
    choice = config.getoption("--bench-device")
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise pytest.UsageError("--bench-device cuda was given but torch sees no CUDA device; use cpu or auto")
    if choice == "auto":
        return ["cuda"] if cuda else ["cpu"]
    if choice == "all":
        return ["cpu", "cuda"] if cuda else ["cpu"]
    return [choice]


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STATE] = BenchSession(started=dt.datetime.now().astimezone().isoformat(timespec="seconds"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every benchmark that takes ``bench_device`` runs once per selected device.
    if "bench_device" in metafunc.fixturenames:
        metafunc.parametrize("bench_device", _devices(metafunc.config))


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config) -> BenchSession:
    """The session's result collector."""
    return pytestconfig.stash[_STATE]


@pytest.fixture
def device(bench_device: str) -> Iterator[torch.device]:
    """The torch device of this case; CUDA memory is released after each case."""
    yield torch.device(bench_device)
    if bench_device == "cuda":
        torch.cuda.empty_cache()


@pytest.fixture
def compile_enabled(pytestconfig: pytest.Config) -> bool:
    return bool(pytestconfig.getoption("--bench-compile"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is None or not state.rows:
        return
    state.finalize()
    out = Path(session.config.getoption("--bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    state.path = out / f"{stamp}.json"
    doc = {
        "started": state.started,
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": sys.argv,
        "exit_status": int(exitstatus),
        "machine": machine_info(),
        "results": state.rows,
    }
    state.path.write_text(json.dumps(doc, indent=1, default=str))


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or not state.rows:
        return
    tr = terminalreporter
    info = machine_info()
    tr.section("vermeer benchmarks")
    tr.write_line(
        f"torch {info['torch']} | {info['device_name']} | threads {info['torch_threads']} "
        f"| python {info['python']}"
    )
    tr.write_line("time ratios: variant time / reference time (1.00 = same, < 1 = faster); speed is never asserted")
    header = f"{'group':<44} {'variant':<30} {'ms':>10} {'vs fastest':>10} {'vs base':>8} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6}  note"
    tr.write_line(header)
    tr.write_line("-" * len(header))
    for r in state.rows:
        note = r.get("note") or r.get("error") or ""
        tr.write_line(
            f"{r['group'][:44]:<44} {(r['name'] + (' *' if r['baseline'] else ''))[:30]:<30} "
            f"{_fmt(r.get('ms'), '10.3f')} {_fmt(r.get('time_vs_fastest'), '10.2f')} "
            f"{_fmt(r.get('time_vs_baseline'), '8.2f')} {_fmt(r.get('images_per_s'), '9.1f')} "
            f"{_fmt(r.get('tflops'), '8.3f')} {_fmt(r.get('mfu'), '6.1%')}  {note}"
        )
    tr.write_line("* = the group's baseline")
    if state.path is not None:
        tr.write_line(f"results written to {state.path}")
