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
import os
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
    machine: dict[str, Any] = field(default_factory=machine_info)
    peaks: dict[str, dict[str, float]] = field(default_factory=dict)  # device type -> dtype -> FLOP/s

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
                if r.get("ms_min") and r.get("ms_max"):
                    r["spread"] = r["ms_max"] / r["ms_min"]
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


#: Square matmul sizes for the peak: large enough to reach the BLAS's steady state on each device
PEAK_N = {"cpu": 1024, "cuda": 8192}


@pytest.fixture
def matmul_peak(device: torch.device, bench: BenchSession) -> dict[str, float]:
    """The device's matmul peak in FLOP/s per dtype (``fp32``, ``bf16``), measured once per
    session and device on an N x N x N matmul (2 N^3 FLOPs) and recorded as group
    ``peak/<dev>/matmul``: the yardstick of every step's ``of_peak`` in the same run."""
    if device.type not in bench.peaks:
        from benchlib import compare

        n = PEAK_N.get(device.type, 1024)
        fns = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            fns[name] = lambda a=a, b=b: torch.mm(a, b)
        cpu = device.type == "cpu"
        timings, errors = compare(fns, device, warmup=2, repeats=5, min_block_ms=200.0 if cpu else 100.0)
        peaks: dict[str, float] = {}
        for name, t in timings.items():
            peaks[name] = 2 * n**3 / (t.min_ms / 1e3)  # the best block: a peak, not a typical
            cpu_peak = 2 * n**3 / (t.cpu_min_ms / 1e3) if t.cpu_min_ms else None
            bench.record(f"peak/{device.type}/matmul-n{n}", name, device=device.type, n=n,
                         tflops=peaks[name] / 1e12, tflops_cpu_time=cpu_peak / 1e12 if cpu_peak else None,
                         **t.as_dict(), note="best block")
        for name, err in errors.items():
            bench.record(f"peak/{device.type}/matmul-n{n}", name, error=err)
        bench.peaks[device.type] = peaks
    return bench.peaks[device.type]


@pytest.fixture
def compile_enabled(pytestconfig: pytest.Config) -> bool:
    return bool(pytestconfig.getoption("--bench-compile"))


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _write(config: pytest.Config, exitstatus: int | None) -> None:
    """(Re)write the results file: after every test, so a run killed by a time limit keeps
    what it measured, and at the end of the session (``exit_status`` then set)."""
    state = config.stash.get(_STATE, None)
    if state is None or not state.rows:
        return
    state.finalize()
    if state.path is None:
        out = Path(config.getoption("--bench-out"))
        out.mkdir(parents=True, exist_ok=True)
        state.path = out / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    doc = {
        "started": state.started,
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds") if exitstatus is not None else None,
        "command": sys.argv,
        "exit_status": exitstatus,
        "machine": {**state.machine, "loadavg_end": _loadavg()},
        "results": state.rows,
    }
    tmp = state.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(state.path)  # never a half-written file
    if exitstatus is not None:  # the README "Performance" table of this run
        from readme_table import render

        state.path.with_suffix(".md").write_text(render(doc))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    _write(item.config, None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _write(session.config, int(exitstatus))


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("ms", "ms", ".3f"),
    ("cpu_ms", "cpu ms", ".3f"),
    ("time_vs_fastest", "vs fastest", ".2f"),
    ("time_vs_baseline", "vs base", ".2f"),
    ("spread", "max/min", ".2f"),
    ("images_per_s", "img/s", ".1f"),
    ("tflops", "TFLOP/s", ".3f"),
    ("mfu", "MFU", ".1%"),
    ("of_peak", "of peak", ".1%"),
    ("baseline_ratio", "vs DiT", ".2f"),
    ("share_of_stage", "of stage", ".1%"),
)


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    """Plain-text table of ``rows`` with only the columns some row has (fits a log's tail)."""
    cols = [c for c in _COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    gw = max(len("group"), *(len(r["group"]) for r in rows))
    nw = max(len("variant"), *(len(r["name"]) + 2 for r in rows))
    widths = [max(len(h), 8) for _, h, _ in cols]
    lines = [f"{'group':<{gw}} {'variant':<{nw}} " + " ".join(f"{h:>{w}}" for (_, h, _), w in zip(cols, widths)) + "  note"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        name = r["name"] + (" *" if r["baseline"] else "")
        cells = " ".join(f"{_fmt(r.get(k), f):>{w}}" for (k, _, f), w in zip(cols, widths))
        lines.append(f"{r['group']:<{gw}} {name:<{nw}} {cells}  {r.get('note') or r.get('error') or ''}")
    return lines


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or not state.rows:
        return
    tr = terminalreporter
    info = state.machine
    tr.section("vermeer benchmarks")
    tr.write_line(
        f"torch {info['torch']} | {info['device_name']} | torch threads {info['torch_threads']} "
        f"| python {info['python']} | load average {info.get('loadavg')} at start, {_loadavg()} at end"
    )
    tr.write_line("ms: median per call. vs fastest / vs base: this time over the group's fastest / baseline (*)")
    tr.write_line("(1.00 = same, < 1 = faster); max/min: slowest over fastest timed block (over ~1.3: a busy")
    tr.write_line("machine, trust ratios less). Speed is reported, never asserted.")
    kinds: dict[str, list[dict[str, Any]]] = {}
    for r in state.rows:
        kinds.setdefault(r["group"].split("/", 1)[0], []).append(r)
    for rows in kinds.values():
        tr.write_line("")
        for line in _table(rows):
            tr.write_line(line)
    if state.path is not None:
        md = state.path.with_suffix(".md")
        if md.exists():
            tr.write_line("")
            for line in md.read_text().splitlines():
                tr.write_line(line)
        tr.write_line(f"\nresults written to {state.path} (README table: {md.name})")
