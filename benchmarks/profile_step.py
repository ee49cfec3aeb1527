"""torch.profiler table of the engine's training step (FSDP2 world of one,
:class:`~vermeer_core.step.TrainStep`, the stage's last phase) on one quickstart stage, and
optionally measured A/B variants of it timed in turns (``benchlib.compare``).

    python benchmarks/profile_step.py                   # core step: 32 px, batch 8, fp32
    python benchmarks/profile_step.py -r 128            # grown 128 px stage, batch 2
    python benchmarks/profile_step.py -r 128 --ab       # + memory format and elementwise A/B
    python benchmarks/profile_step.py --bf16            # bf16 autocast

The A/B variants (``--ab``), against the current model code (grown stages on CPU run their
convolutions channels-last: ``VermeerModel.channels_last_cpu``): ``nchw`` (that switched off:
the default contiguous format, as before it was adopted) and ``addcmul`` (a candidate not
adopted: the ResBlock modulation and the core Block's gated residuals as one ``addcmul`` each
instead of a multiply and an add; it measured within +-0.5% of the current code).
Each prints wall and process CPU ms per step, and the difference of the first step's loss
from the current code's (same seeds: equal within fp32 rounding).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import compare  # noqa: E402
from stepcase import engine_step, private_copy, quickstart_spec, stage_models  # noqa: E402
from vermeer_core.distributed import end_process, init_distributed, shutdown  # noqa: E402

BATCH = {32: 8, 64: 4, 128: 2, 256: 1}


def addcmul_resblock_forward(self: torch.nn.Module, x: Tensor, cond: Tensor) -> Tensor:
    """Candidate ``ResBlock.forward`` (``plugins/resblock.py``): the scale-shift modulation as
    one ``addcmul`` instead of a multiply and an add."""
    h = self.conv1(self.act(self.norm1(x)))
    scale, shift = self.cond_proj(self.act(cond))[:, :, None, None].chunk(2, dim=1)
    h = torch.addcmul(shift, self.norm2(h), 1 + scale)
    return x + self.conv2(self.dropout(self.act(h)))


def addcmul_block_forward(self: torch.nn.Module, x: Tensor, cond: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
    """Candidate core ``Block.forward`` (``plugins/shallow_uvit.py``): each gated residual
    ``x + gate * branch`` as one ``addcmul``."""
    from vermeer_plugins.shallow_uvit import modulate

    (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate,
     mlp_shift, mlp_scale, mlp_gate) = self.ada(cond)[:, None, :].chunk(9, dim=-1)
    x = torch.addcmul(x, sa_gate, self.drop(self.attn(modulate(self.norm1(x), sa_shift, sa_scale))))
    x = torch.addcmul(x, ca_gate, self.drop(self.cross(modulate(self.norm2(x), ca_shift, ca_scale), text, text_mask)))
    return torch.addcmul(x, mlp_gate, self.drop(self.mlp(modulate(self.norm3(x), mlp_shift, mlp_scale))))


def use_addcmul(model: torch.nn.Module) -> None:
    """Put the candidate forwards on every ResBlock and core Block of ``model``."""
    from vermeer_plugins.resblock import ResBlock
    from vermeer_plugins.shallow_uvit import Block

    for m in model.modules():
        if isinstance(m, ResBlock):
            m.forward = types.MethodType(addcmul_resblock_forward, m)  # type: ignore[method-assign]
        elif isinstance(m, Block):
            m.forward = types.MethodType(addcmul_block_forward, m)  # type: ignore[method-assign]


def contiguous_format(model: torch.nn.Module) -> None:
    """Run the conv stages in the default (NCHW) format: ``VermeerModel.channels_last_cpu``
    off, as before it was adopted."""
    model.channels_last_cpu = False  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-r", "--resolution", type=int, default=32, choices=sorted(BATCH))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps); 0: no profile")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--ab", action="store_true", help="also time the A/B variants in turns")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds of the A/B")
    args = ap.parse_args(argv)
    info = init_distributed(device="cpu")
    spec = quickstart_spec()
    stage = [s.resolution for s in spec.stages].index(args.resolution)
    model = stage_models(spec, stage)[stage]
    batch = BATCH[args.resolution]
    dev = info.device

    def make(**kw: object):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        return engine_step(private_copy(model), spec, stage, batch, dev, info.mesh, bf16=args.bf16, **kw)  # type: ignore[arg-type]

    if args.steps > 0:
        step = make()
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(args.steps):
                step()
        print(f"# {args.resolution} px, batch {batch}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
              f"{args.steps} steps, torch threads {torch.get_num_threads()}")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))
        del step
    if args.ab:
        variants = {"current": make(), "nchw": make(prepare=contiguous_format), "addcmul": make(prepare=use_addcmul)}
        losses = {name: float(fn().loss) for name, fn in variants.items()}  # first step: same seeds
        timings, errors = compare(variants, dev, warmup=1, repeats=args.repeats, min_block_ms=0.0)
        base = timings["current"].median_ms if "current" in timings else None
        cbase = timings["current"].cpu_median_ms if "current" in timings else None
        print(f"\n# A/B, {args.repeats} rounds in turns: wall ms per step median (min-max), vs current; "
              "process CPU ms per step median (min), vs current; |loss - current's| at the first step")
        for name, t in timings.items():
            rel = f"{t.median_ms / base:.3f}" if base else "-"
            crel = f"{t.cpu_median_ms / cbase:.3f}" if cbase and t.cpu_median_ms else "-"
            print(f"{name:<16} wall {t.median_ms:9.1f} ({t.min_ms:.1f}-{t.max_ms:.1f}) {rel}   "
                  f"cpu {t.cpu_median_ms:9.1f} ({t.cpu_min_ms:.1f}) {crel}   {abs(losses[name] - losses['current']):.2e}")
        for name, err in errors.items():
            print(f"{name:<20} failed: {err}")
    shutdown()


if __name__ == "__main__":
    main()
    end_process(0)
