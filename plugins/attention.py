"""Attention kernels: ``math`` (reference), ``sdpa``, ``xformers`` and ``auto`` (fastest available).

Every kernel follows :class:`vermeer_core.interfaces.AttentionFn`: ``q, k, v`` are
``(B, S, H, D)``, ``key_mask`` is ``(B, Sk)`` bool with True = attend, the result is
``(B, Sq, H, D)``. All kernels agree on one edge case the libraries treat differently: a batch
row whose keys are all masked out returns zeros (instead of NaN or an average of padding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import ModuleType
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vermeer_core.api import AttentionFn, ComponentConfig, hookimpl, Registry

__all__ = [
    "AttentionUnavailableError",
    "AutoAttention",
    "AutoConfig",
    "MathConfig",
    "SDPAConfig",
    "XFormersConfig",
    "available_backends",
    "math_attention",
    "sdpa_attention",
    "vermeer_register",
    "xformers_attention",
]


class AttentionUnavailableError(RuntimeError):
    """The chosen attention kernel cannot run here; the message says what to use instead."""


class MathConfig(ComponentConfig):
    """Explicit softmax(QK^T/sqrt(d))V with fp32 accumulation: slow, the numerical reference."""


class SDPAConfig(ComponentConfig):
    """``torch.nn.functional.scaled_dot_product_attention`` (PyTorch picks flash/cuDNN/mem-eff)."""


class XFormersConfig(ComponentConfig):
    """``xformers.ops.memory_efficient_attention``; CUDA only, needs the ``gpu`` extra."""


class AutoConfig(ComponentConfig):
    """Times every available kernel once per input signature and keeps the fastest."""


# --- shared mask handling -----------------------------------------------------------------
def _guard_empty_rows(key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Return (mask, keep): rows with no real key attend everywhere (so no kernel makes NaN)
    and ``keep`` (B, 1, 1, 1) zeroes their output afterwards. No host sync."""
    keep = key_mask.any(dim=1)
    return key_mask | ~keep[:, None], keep[:, None, None, None]


def _masked(kernel: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]) -> AttentionFn:
    """Wrap a raw kernel so that every backend treats fully-masked rows the same way."""

    @functools.wraps(kernel)
    def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        if key_mask is None:
            return kernel(q, k, v, None)
        mask, keep = _guard_empty_rows(key_mask.to(device=q.device, dtype=torch.bool))
        return kernel(q, k, v, mask) * keep.to(q.dtype)

    return attend


# --- math ---------------------------------------------------------------------------------
def _math(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """Scaled dot-product attention of Vaswani et al. (2017), written out in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float())
    return out.to(q.dtype)


# --- sdpa ---------------------------------------------------------------------------------
def _sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    # (B,S,H,D) -> (B,H,S,D) is a stride permutation, not a copy; the fused kernels accept it.
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


# --- xformers -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _xformers_ops() -> ModuleType | None:
    """``xformers.ops`` if it imports on a CUDA machine, else None. Never imported without CUDA:
    there it only warns and then fails on every call."""
    if not torch.cuda.is_available():
        return None
    try:
        import xformers.ops as xops
    except Exception:  # noqa: BLE001 - a broken build raises more than ImportError
        return None
    return xops


def _xformers_bias(key_mask: Tensor, dtype: torch.dtype, heads: int, q_len: int) -> Tensor:
    """Additive (B, H, Sq, Sk) bias for xformers from a (B, Sk) key mask.

    xformers 0.0.35 wants a tensor bias of exactly (B, H, Mq, Mk), last stride 1 and every other
    stride a multiple of 16 bytes (cutlass ``_check_bias_alignment``); stride 0 counts as
    aligned. So: one (B, 1, 1, Sk rounded up to 8) row per batch element, sliced to Sk and
    expanded (a view, no (B, H, Sq, Sk) tensor is materialised)."""
    batch, k_len = key_mask.shape
    padded = -(-k_len // 8) * 8
    bias = torch.zeros(batch, 1, 1, padded, dtype=dtype, device=key_mask.device)
    bias[..., :k_len].masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    return bias[..., :k_len].expand(batch, heads, q_len, k_len)


def _xformers(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    if q.device.type != "cuda":
        raise AttentionUnavailableError(
            f"attention 'xformers' runs on CUDA tensors only (got {q.device.type}); "
            "use attention type 'sdpa' or 'auto' on this device"
        )
    xops = _xformers_ops()
    if xops is None:
        raise AttentionUnavailableError(
            "attention 'xformers' needs the xformers package, which does not import here; "
            "install the gpu extra (pip install 'vermeer[gpu]') or use attention type 'sdpa' or 'auto'"
        )
    bias = None if key_mask is None else _xformers_bias(key_mask, q.dtype, q.shape[2], q.shape[1])
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias)


math_attention: AttentionFn = _masked(_math)
sdpa_attention: AttentionFn = _masked(_sdpa)
xformers_attention: AttentionFn = _masked(_xformers)


def available_backends() -> list[str]:
    """Names of the concrete kernels that can run on this machine (``auto`` chooses among them)."""
    return ["math", "sdpa"] + (["xformers"] if _xformers_ops() is not None else [])


# --- auto ---------------------------------------------------------------------------------
_Signature = tuple[str, torch.dtype, tuple[int, ...], tuple[int, ...], bool, bool]


def _keep(t: Tensor) -> Tensor:
    return t


def isolated_autograd() -> torch.autograd.graph.saved_tensors_hooks:
    """Identity saved-tensor hooks on top of the stack: autograd work done inside (auto's timing
    runs) is invisible to enclosing hooks, e.g. activation checkpointing's, which would
    otherwise count tensors the recomputation (cached choice, no timing) never saves again
    and fail with "a different number of tensors was saved"."""
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


def _time_ms(fn: AttentionFn, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, grad: bool) -> float:
    """Mean milliseconds of one call (forward, plus backward when training) after warm-up."""
    with isolated_autograd():
        return _time_ms_inner(fn, q, k, v, key_mask, grad)


def _time_ms_inner(fn: AttentionFn, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, grad: bool) -> float:
    q, k, v = (t.detach().requires_grad_(grad) for t in (q, k, v))

    def step() -> None:
        out = fn(q, k, v, key_mask)
        if grad:
            out.backward(torch.ones_like(out))

    with torch.enable_grad() if grad else torch.no_grad():
        for _ in range(3):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            step()
        end.record()
        torch.cuda.synchronize(q.device)
    return start.elapsed_time(end) / 5


class AutoAttention:
    """Dispatches to the fastest available kernel for each (device type, dtype, q shape,
    k shape, mask?, training?) signature. Without CUDA or xformers there is nothing to choose:
    ``sdpa`` runs directly. Otherwise each candidate is timed once per signature (the first
    call pays for it) and the winner is cached; ``choices`` shows what was picked."""

    # math is never a candidate: it is always slowest and materialises (B, H, Sq, Sk) in fp32.
    candidates: ClassVar[dict[str, AttentionFn]] = {"sdpa": sdpa_attention, "xformers": xformers_attention}

    def __init__(self) -> None:
        self.choices: dict[_Signature, str] = {}

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        return self.candidates[self.choose(q, k, v, key_mask)](q, k, v, key_mask)

    def choose(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> str:
        """The kernel name used for inputs like these (timing the candidates if not yet known)."""
        if q.device.type != "cuda" or _xformers_ops() is None:
            return "sdpa"
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        sig: _Signature = (q.device.type, q.dtype, tuple(q.shape), tuple(k.shape), key_mask is not None, grad)
        name = self.choices.get(sig)
        if name is not None:
            return name
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return "sdpa"  # cannot time inside a trace or a CUDA graph; decide on an eager call
        times: dict[str, float] = {}
        for cand, fn in self.candidates.items():
            try:  # on detached copies: timing never touches the caller's autograd graph
                times[cand] = _time_ms(fn, q, k, v, key_mask, grad)
            except (RuntimeError, NotImplementedError, ValueError):
                continue  # this kernel does not support the shape/dtype: not a candidate
        name = min(times, key=times.__getitem__) if times else "sdpa"
        self.choices[sig] = name
        return name


# --- registration -------------------------------------------------------------------------
def build_math(config: MathConfig) -> AttentionFn:
    return math_attention


def build_sdpa(config: SDPAConfig) -> AttentionFn:
    return sdpa_attention


def build_xformers(config: XFormersConfig) -> AttentionFn:
    # No import here: a spec naming xformers must still build (e.g. for `vermeer plan`) on a
    # machine without a GPU; the call explains what to do if it cannot run.
    return xformers_attention


def build_auto(config: AutoConfig) -> AttentionFn:
    return AutoAttention()


@hookimpl
def vermeer_register(registry: Registry) -> None:
    registry.add("attention", "math", build_math, MathConfig)
    registry.add("attention", "sdpa", build_sdpa, SDPAConfig)
    registry.add("attention", "xformers", build_xformers, XFormersConfig)
    registry.add("attention", "auto", build_auto, AutoConfig)
