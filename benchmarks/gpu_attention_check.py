"""GPU check of the attention kernels: numerics against the fp32 ``math`` reference and timing.

Run on a CUDA machine: ``python benchmarks/gpu_attention_check.py [--out FILE] [--iters N]``.
For each shape (self- and cross-attention, with and without key masks, key lengths that are
not multiples of 8, a fully masked row) and dtype (bf16, fp16) it compares ``sdpa``,
``xformers`` (when importable) and ``auto`` with ``math`` computed in fp32, times each kernel
forward and forward+backward, records what ``auto`` picked and how far it is from the fastest,
and prints one JSON summary. Exit status 1 if any kernel disagrees with the reference or
fails; 2 without CUDA. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_attention_module() -> Any:
    """``vermeer_plugins.attention``, or the file itself when vermeer is not installed."""
    sys.path.insert(0, str(ROOT))  # vermeer_core lives at the repository root
    try:
        from vermeer_plugins import attention
    except ImportError:
        spec = importlib.util.spec_from_file_location("vermeer_attention_check", ROOT / "plugins" / "attention.py")
        attention = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(attention)
    return attention


att = _load_attention_module()

# (name, batch, q_len, k_len, heads, head_dim, mask kind); the core's shapes at 16x16 and 32x32
SHAPES = [
    ("self-256-w512", 32, 256, 256, 8, 64, None),
    ("self-256-w512-mask", 32, 256, 256, 8, 64, "padding"),
    ("cross-256x77-mask", 32, 256, 77, 8, 64, "padding"),
    ("cross-256x77-nomask", 32, 256, 77, 8, 64, None),
    ("self-1024-w1024", 16, 1024, 1024, 16, 64, None),
    ("cross-1024x128-d128-mask", 16, 1024, 128, 8, 128, "padding"),
    ("cross-64x13-empty-row", 4, 64, 13, 4, 64, "empty-row"),
]
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2}


def make_inputs(b: int, sq: int, sk: int, h: int, d: int, mask_kind: str | None, dtype: torch.dtype):
    """q, k, v as the core produces them: strided views of fused projections."""
    g = torch.Generator(device="cuda").manual_seed(0)
    if sq == sk:
        q, k, v = torch.randn(b, sq, 3, h, d, device="cuda", dtype=dtype, generator=g).unbind(2)
    else:
        q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype, generator=g)
        k, v = torch.randn(b, sk, 2, h, d, device="cuda", dtype=dtype, generator=g).unbind(2)
    mask = None
    if mask_kind is not None:
        lengths = torch.randint(1, sk + 1, (b,), device="cuda", generator=g)
        lengths[0] = sk
        mask = torch.arange(sk, device="cuda")[None, :] < lengths[:, None]
        if mask_kind == "empty-row":
            mask[1] = False
    return q, k, v, mask


def time_ms(fn, q, k, v, mask, backward: bool, iters: int) -> float:
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))

    def step() -> None:
        out = fn(q, k, v, mask)
        if backward:
            out.backward(torch.ones_like(out))

    with torch.enable_grad() if backward else torch.no_grad():
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def check_case(shape: tuple, dtype: torch.dtype, iters: int) -> dict[str, Any]:
    name, b, sq, sk, h, d, mask_kind = shape
    q, k, v, mask = make_inputs(b, sq, sk, h, d, mask_kind, dtype)
    ref = att.math_attention(q.float(), k.float(), v.float(), mask)
    kernels = {"sdpa": att.sdpa_attention, "math": att.math_attention}
    if "xformers" in att.available_backends():
        kernels["xformers"] = att.xformers_attention
    result: dict[str, Any] = {"shape": name, "dtype": str(dtype).removeprefix("torch."), "kernels": {}}
    for kname, fn in kernels.items():
        entry: dict[str, Any] = {}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = fn(q, k, v, mask)
                torch.cuda.synchronize()
            err = (out.float() - ref).abs().max().item()
            entry["max_abs_err"] = err
            entry["ok"] = bool(torch.isfinite(out).all().item()) and err <= TOLERANCE[dtype]
            entry["warnings"] = sorted({str(w.message)[:200] for w in caught})
            entry["fwd_ms"] = time_ms(fn, q, k, v, mask, False, iters)
            entry["fwd_bwd_ms"] = time_ms(fn, q, k, v, mask, True, iters)
        except Exception as exc:  # noqa: BLE001 - report every failure in the summary
            entry.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
        result["kernels"][kname] = entry
    # auto: the choice for a training call (inputs need grad) and for inference
    auto = att.AutoAttention()
    fast = {n: e for n, e in result["kernels"].items() if n != "math" and "fwd_ms" in e}
    for mode, backward, key in (("train", True, "fwd_bwd_ms"), ("infer", False, "fwd_ms")):
        try:
            qg, kg, vg = (t.detach().requires_grad_(backward) for t in (q, k, v))
            with torch.enable_grad() if backward else torch.no_grad():
                choice = auto.choose(qg, kg, vg, mask)
                out = auto(qg, kg, vg, mask)
            err = (out.float() - ref).abs().max().item()
            auto_ms = time_ms(auto, q, k, v, mask, backward, iters)
            best = min((e[key] for e in fast.values()), default=float("nan"))
            result[f"auto_{mode}"] = {
                "choice": choice, "ms": auto_ms, "best_ms": best, "ratio_to_best": auto_ms / best,
                "within_5pct": auto_ms <= 1.05 * best, "max_abs_err": err, "ok": err <= TOLERANCE[dtype],
            }
        except Exception as exc:  # noqa: BLE001
            result[f"auto_{mode}"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    result["ok"] = all(e.get("ok", False) for e in result["kernels"].values()) and all(
        result[f"auto_{m}"]["ok"] for m in ("train", "infer")
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "CUDA is not available; run this on a GPU machine"}))
        return 2
    try:
        import xformers

        xformers_version = xformers.__version__
    except Exception as exc:  # noqa: BLE001
        xformers_version = f"not importable ({type(exc).__name__})"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    cases = [check_case(shape, dtype, args.iters) for dtype in (torch.bfloat16, torch.float16) for shape in SHAPES]
    summary = {
        "ok": all(c["ok"] for c in cases),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "xformers": xformers_version,
        "python": platform.python_version(),
        "available_backends": att.available_backends(),
        "auto_within_5pct": sum(c[f"auto_{m}"].get("within_5pct", False) for c in cases for m in ("train", "infer")),
        "auto_decisions": 2 * len(cases),
        "cases": cases,
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
