"""One prepared benchmark run for a lent CUDA machine (standard library only; see README.md).

    python3 benchmarks/run_gpu.py [--out DIR]        (benchmarks/gpu_check.sh wraps it with a log)

1. Installs the wheels carried in ``.whl/`` that this Python lacks into ``--site`` (default
   /tmp/site) and puts it on PYTHONPATH: the pydantic family (and xformers) when missing or
   older than carried, the rest only when missing. Wheels that do not fit this interpreter are
   skipped with a message.
2. Makes vermeer importable with its plugin entry points: if no ``vermeer`` entry point is
   visible (the project is not pip-installed), writes a minimal ``vermeer.dist-info`` with the
   entry points of pyproject.toml into the site folder and links ``vermeer_plugins`` to
   ``plugins/`` - no build, no network.
3. Prints the environment, then runs ``pytest benchmarks -q -s`` (CUDA cases, with
   ``--bench-compile``) and, with CUDA, ``benchmarks/gpu_attention_check.py``, each under a time
   limit, results into ``--out`` (default $OUT, else benchmarks/results), and prints a short
   digest last (so it is in the tail of a captured log). Without CUDA it says so and runs the
   CPU benchmarks only.

Exit status: 0 all passed; 3 wheel install failed; 4 vermeer does not import; otherwise the
first non-zero status of pytest / the attention check (124 = time limit).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Installed when missing or older than the carried wheel (pydantic-core pins typing-extensions);
# every other carried wheel only when missing, so the machine's own test tools stay as they are.
UPGRADE = {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "xformers"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _packaging() -> Any:
    try:
        import packaging.tags
        import packaging.utils
        import packaging.version
        return packaging
    except ImportError:  # pip vendors it: present wherever pip is
        import pip._vendor.packaging.tags
        import pip._vendor.packaging.utils
        import pip._vendor.packaging.version

        return pip._vendor.packaging


def select_wheels(folder: Path) -> list[Path]:
    """The wheels in ``folder`` this interpreter needs (see the module docstring)."""
    pk = _packaging()
    supported = set(pk.tags.sys_tags())
    chosen: list[Path] = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, tags = pk.utils.parse_wheel_filename(wheel.name)
        try:
            have: str | None = md.version(str(name))
        except md.PackageNotFoundError:
            have = None
        needed = have is None or (_norm(str(name)) in UPGRADE and pk.version.Version(have) < version)
        if not needed:
            continue
        if not supported & set(tags):
            print(f"[run_gpu] skip {wheel.name}: not built for this Python/platform (have {have or 'none'})")
            continue
        print(f"[run_gpu] install {name} {version} (have {have or 'none'})")
        chosen.append(wheel)
    return chosen


def _entry_points_from_pyproject() -> tuple[str, dict[str, str]]:
    """(version, {entry point: module}) of the ``vermeer`` group in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        data = tomllib.loads(text)
        return data["project"]["version"], dict(data["project"]["entry-points"]["vermeer"])
    except ImportError:  # Python < 3.11: the section is simple enough to read by hand
        version = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        section = re.search(r"^\[project\.entry-points\.vermeer\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S)
        eps = dict(re.findall(r'^([\w.-]+)\s*=\s*"([^"]+)"', section.group(1) if section else "", re.M))
        return (version.group(1) if version else "0"), eps


def write_shim(site: Path) -> None:
    """Make ``vermeer_core``/``vermeer_plugins`` importable from the checkout with entry points."""
    version, eps = _entry_points_from_pyproject()
    info = site / f"vermeer-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vermeer\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[vermeer]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    link = site / "vermeer_plugins"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(ROOT / "plugins", target_is_directory=True)
    print(f"[run_gpu] vermeer is not installed here: entry points {sorted(eps)} registered from {info}")


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)


# Installed = the entry points are visible *and* their modules import (a stray vermeer.egg-info
# in the working directory shows entry points without the editable finder that serves them).
_HAS_VERMEER = (
    "import importlib.metadata as m, sys; "
    "eps = [e for e in m.entry_points(group='vermeer') if e.name == 'attention']; "
    "eps[0].load() if eps else sys.exit(1)"
)
_REPORT = r"""
import importlib.metadata as m, json, platform, torch
def v(n):
    try: return m.version(n)
    except m.PackageNotFoundError: return None
r = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
     "cuda_available": torch.cuda.is_available(),
     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
r.update({n: v(n) for n in ("pydantic", "pydantic-core", "pluggy", "pytest", "rich", "fsspec", "safetensors", "xformers")})
if torch.cuda.is_available() and v("xformers"):
    try:
        import xformers; r["xformers_cpp_extensions_loaded"] = bool(getattr(xformers, "_has_cpp_library", False))
    except Exception as e: r["xformers_import_error"] = repr(e)[:200]
from vermeer_core.plugins import get_plugins
p = get_plugins()
r["attention_kernels"] = p.registry.names("attention")
r["plugin_failures"] = [str(f) for f in p.failures]
print(json.dumps(r))
"""


def run_limited(cmd: list[str], limit: float, env: dict[str, str], stdout: Any = None) -> int:
    """Run ``cmd`` in its own process group; on the time limit end that group (compile workers
    included) and return 124, as timeout(1) does."""
    print(f"[run_gpu] $ {' '.join(cmd)}   (limit {limit:.0f} s)", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, start_new_session=True)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"[run_gpu] time limit of {limit:.0f} s reached: stopping it", flush=True)
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return 124


def digest(results: Path | None, attention: Path | None) -> None:
    """A few lines per result group: what to read first."""
    print("\n========== digest ==========")
    if results is not None and results.exists():
        doc = json.loads(results.read_text())
        print(f"{results.name}: {doc['machine'].get('device_name')} | torch {doc['machine'].get('torch')}")
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in doc["results"]:
            groups.setdefault(r["group"], []).append(r)
        for group, rows in groups.items():
            if group.startswith("attention/"):
                parts = ", ".join(f"{r['name']} {r['ms']:.3f}" if r.get("ms") else f"{r['name']} failed" for r in rows)
                auto = next((r for r in rows if r["name"] == "auto" and "auto_vs_best_kernel" in r), None)
                verdict = f" | auto->{auto['picked']} {auto['auto_vs_best_kernel']:.2f}x best" if auto else ""
                print(f"{group}: {parts} ms{verdict}")
                continue
            for r in rows:
                if not r.get("ms"):
                    print(f"{group} {r['name']}: FAILED {r.get('error', '')[:150]}")
                    continue
                bits = [f"{r['ms']:.1f} ms"]
                if r.get("images_per_s") is not None:
                    bits.append(f"{r['images_per_s']:.1f} img/s")
                if r.get("tflops") is not None:
                    bits.append(f"{r['tflops']:.2f} TFLOP/s")
                if r.get("mfu") is not None:
                    bits.append(f"MFU {r['mfu']:.1%}")
                if r.get("time_vs_baseline") is not None:
                    bits.append(f"time x{r['time_vs_baseline']:.2f} of baseline")
                print(f"{group} {r['name']}{' (baseline)' if r.get('baseline') else ''}: {', '.join(bits)}")
    else:
        print("no pytest results file was written")
    if attention is not None and attention.exists():
        doc = json.loads(attention.read_text())
        print(f"gpu_attention_check: ok={doc.get('ok')} auto within 5%: {doc.get('auto_within_5pct')}/{doc.get('auto_decisions')}"
              f" | xformers {doc.get('xformers')}")
        for case in doc.get("cases", []):
            if not case.get("ok"):
                bad = {k: e.get("error") or e.get("max_abs_err") for k, e in case.get("kernels", {}).items() if not e.get("ok")}
                print(f"  NOT OK {case['shape']} {case['dtype']}: {json.dumps(bad)[:200]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where carried wheels are installed")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    parser.add_argument("--pytest-limit", type=float, default=330.0, help="seconds for pytest benchmarks")
    parser.add_argument("--attention-limit", type=float, default=120.0, help="seconds for gpu_attention_check.py")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile training variant")
    parser.add_argument("--shim", action="store_true", help="register vermeer from the checkout even if installed")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    started = time.time()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")

    if args.wheels.is_dir():
        wheels = select_wheels(args.wheels)
        if wheels:
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(args.site), *map(str, wheels)]
            if subprocess.run(cmd).returncode != 0:
                print("[run_gpu] installing the carried wheels failed (see pip's message above)")
                return 3
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.site), env.get("PYTHONPATH")]))
    else:
        print(f"[run_gpu] no {args.wheels}: using the packages installed here")
    if args.shim or _python(_HAS_VERMEER, env).returncode != 0:
        write_shim(args.site)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(args.site), env.get("PYTHONPATH")]))

    report = _python(_REPORT, env)
    if report.returncode != 0:
        print(f"[run_gpu] vermeer does not import with this environment:\n{report.stderr[-3000:]}")
        return 4
    info = json.loads(report.stdout.strip().splitlines()[-1])
    print(f"[run_gpu] environment: {json.dumps(info)}")
    cuda = bool(info["cuda_available"])
    if not cuda:
        print("[run_gpu] CUDA is not available here: running the CPU benchmarks only "
              "(the CUDA cases and gpu_attention_check.py need a GPU machine)")

    # One benchmark module that cannot import here (a missing optional package) must not cost
    # the whole run: the others still run and the error is reported.
    pytest_cmd = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-s", "-p", "no:cacheprovider",
                  "--continue-on-collection-errors",
                  "--bench-out", str(out), *(["--bench-compile"] if cuda and not args.no_compile else []), *args.pytest_args]
    rc_bench = run_limited(pytest_cmd, args.pytest_limit, env)
    newest = [p for p in out.glob("*.json") if p.name != "gpu_attention_check.json" and p.stat().st_mtime >= started]
    results = max(newest, key=lambda p: p.stat().st_mtime) if newest else None

    rc_attention, attention = 0, None
    if cuda:
        attention = out / "gpu_attention_check.json"
        # its stdout repeats the JSON file at length: kept out of the log's tail
        rc_attention = run_limited([sys.executable, "benchmarks/gpu_attention_check.py", "--out", str(attention)],
                                   args.attention_limit, env, stdout=subprocess.DEVNULL)
    digest(results, attention)
    print(f"[run_gpu] pytest exit {rc_bench}; gpu_attention_check exit {rc_attention if cuda else 'not run (no CUDA)'}; "
          f"{time.time() - started:.0f} s; files in {out}: {sorted(p.name for p in out.iterdir())}")
    return rc_bench or rc_attention


if __name__ == "__main__":
    sys.exit(main())
