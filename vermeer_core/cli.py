"""The ``vermeer`` command line. User errors print a message and exit non-zero, no traceback:
2 for an invalid spec (or plugin), 1 for other problems (missing checkpoint, bad data...)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vermeer_core.errors import VermeerError
from vermeer_core.plugins import PluginError, get_plugins
from vermeer_core.registry import Registry
from vermeer_core.spec import RunSpec, SpecError, load_spec, spec_model

if TYPE_CHECKING:
    from vermeer_core.branch import Branch

__all__ = ["main", "build_parser"]




def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="path to a YAML run spec (see specs/)")
    p.add_argument("--no-size-check", action="store_true",
                   help="accept a spec whose training memory (plan's estimate, all ranks) exceeds 256 TiB")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set stages.0.batch_size=8 (repeatable)",
    )


def _add_from_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--from", dest="branch_from", metavar="CKPT", help=help)


def _branch(args: argparse.Namespace, spec: RunSpec) -> Branch | None:
    """The verified branch point of ``--from`` (None without it); reads only."""
    if not args.branch_from:
        return None
    from vermeer_core.branch import branch_point

    return branch_point(args.branch_from, spec, verify=spec.train.verify_checkpoints)


def _load_checked(args: argparse.Namespace, registry: Registry) -> RunSpec:
    """The spec, validated, with its growth schedule (transfers, phases) resolved on meta
    models: any problem is a :class:`SpecError` (exit 2) before anything is written."""
    from vermeer_core.preflight import check_growth

    spec = load_spec(args.spec, registry, args.overrides)
    check_growth(spec, registry, args.spec)
    if not args.no_size_check:
        from vermeer_core.memcheck import check_sane

        check_sane(spec, registry, args.spec)
    return spec


def _cmd_validate(args: argparse.Namespace) -> int:
    spec = _load_checked(args, get_plugins().registry)
    print(f"{args.spec}: valid ({len(spec.stages)} stages: " + " -> ".join(str(s.resolution) for s in spec.stages) + ")")
    branch = _branch(args, spec)
    if branch is not None:
        m = branch.meta
        print(f"can start from {branch.url} (stage {m['stage']}, phase {m['phase_name']}, step {m['step']})")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from vermeer_core.plan import plan_rows, print_plan

    registry = get_plugins().registry
    spec = _load_checked(args, registry)
    branch = _branch(args, spec)
    start = 0
    if branch is not None:
        from vermeer_core.schedule_table import checkpoint_step, step_table

        start = checkpoint_step(step_table(spec, registry), branch.meta)
    rows = plan_rows(spec, registry, world_size=args.world_size, start=start)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_plan(spec, rows, world_size=args.world_size, branch=None if branch is None else branch.url)
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    plugins = get_plugins()
    rows = []
    for comp in plugins.registry:
        dist, version = plugins.origins.get(comp.plugin, ("<registered directly>", ""))
        rows.append({"kind": comp.kind, "name": comp.name, "plugin": comp.plugin, "distribution": dist, "version": version})
    if args.json:
        print(json.dumps({"components": rows, "failures": [str(f) for f in plugins.failures]}, indent=2))
        return 0
    table = Table(title="vermeer components")
    for col in ("kind", "name", "plugin", "distribution", "version"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(r[c] for c in ("kind", "name", "plugin", "distribution", "version")))
    console = Console()
    console.print(table)
    for f in plugins.failures:
        console.print(f"[red]{f}[/red]")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    schema = spec_model(get_plugins().registry).model_json_schema()
    text = json.dumps(schema, indent=2)
    if args.out:
        from vermeer_core.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vermeer", description="Train pixel-space text-to-image diffusion models by greedy growing."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a spec and exit (0 = valid, 2 = invalid)")
    _add_spec_args(p)
    _add_from_arg(p, "also check that the spec can start from this checkpoint (as `vermeer run --from` does)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("plan", help="per stage and phase: resolution, parameters, GFLOP/img, memory")
    _add_spec_args(p)
    p.add_argument("--world-size", type=int, default=1, help="report per-rank memory for N ranks (FSDP)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    _add_from_arg(p, "plan a run that starts from this checkpoint (as `run --from`): what it trains and costs")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("plugins", help="list registered components with their distributions")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("schema", help="JSON Schema of run specs (for editors)")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("run", help="train every stage and phase of a spec")
    _add_spec_args(p)
    p.add_argument("--out", help="run directory or URL (default: runs/<spec name>)")
    p.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto: continue from the newest committed checkpoint in --out (default)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="launch N ranks on this node through torch.distributed.run")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--smoke", action="store_true",
                   help="every stage and phase for 2 steps with tiny widths (checks a schedule end to end on CPU)")
    _add_from_arg(p, "start from another run's checkpoint (or run dir: its newest): the spec must equal that "
                     "run's up to the checkpoint's stage; later stages may differ (a new run in --out)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="start even when plan's per-rank peak exceeds the memory this machine offers")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("sample", help="generate images from a checkpoint, run directory or .safetensors")
    p.add_argument("checkpoint", help="checkpoint dir, run dir (newest checkpoint) or exported .safetensors")
    p.add_argument("--prompt", action="append", required=True, help="caption (repeatable: one image each)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the spec's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance weight (default: the spec's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", help="registered sampler name (default: the spec's)")
    p.add_argument("--grid", choices=("logsnr", "t"),
                   help="noise levels uniform in log-SNR or in t (default: the spec's)")
    p.add_argument("--out", required=True, help="PNG path/URL (a grid when several prompts)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the checkpoint's file digests (sizes and metadata are still checked)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("eval", help="score a checkpoint on held-out prompts: metrics JSON + pass/fail grid PNG")
    p.add_argument("checkpoint", help="checkpoint dir, run dir (newest checkpoint) or exported .safetensors")
    p.add_argument("--prompts", type=int, help="number of held-out prompts (default: the spec's eval.prompts, else 64)")
    p.add_argument("--seed", type=int, help="which held-out prompts, and the noise (default: eval.seed, else 1234)")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="registered metric (repeatable; default: the spec's eval.metrics, else alignment + swd)")
    p.add_argument("--steps", type=int, help="sampling steps (default: eval.steps, else sampling.steps)")
    p.add_argument("--guidance", type=float, help="CFG weight (default: eval.guidance, else sampling.guidance)")
    p.add_argument("--out", help="output directory (default: <run>/eval/<checkpoint name>); writes eval.json, grid.png")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the checkpoint's file digests (sizes and metadata are still checked)")
    p.set_defaults(func=_cmd_eval)

    from vermeer_core.data_cli import register as register_data

    register_data(sub, get_plugins().manager)  # `vermeer data` actions come from plugins

    p = sub.add_parser("export", help="write consolidated EMA weights + spec as safetensors")
    p.add_argument("checkpoint", help="checkpoint dir or run dir (newest checkpoint)")
    p.add_argument("--out", required=True, help="output .safetensors path/URL")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the checkpoint's file digests (sizes and metadata are still checked)")
    p.set_defaults(func=_cmd_export)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from vermeer_core.io import join

    plugins = get_plugins()
    spec = _load_checked(args, plugins.registry)  # exit 2 before any output exists
    if args.smoke:
        from vermeer_core.smoke import smoke_spec

        spec = smoke_spec(spec, plugins.registry, world_size=max(1, args.nproc_per_node))
    out = args.out or join("runs", spec.name)
    if args.branch_from and args.smoke:
        raise SpecError("command line", [("--from", "--smoke changes the widths, so it cannot start from a checkpoint")])
    branch = _branch(args, spec)  # nothing written yet
    if not args.no_memory_check and "RANK" not in os.environ:  # once, in the launching process
        from vermeer_core.memcheck import check_fits

        check_fits(spec, plugins.registry, args.spec, world_size=max(1, args.nproc_per_node),
                   device=_device(args.device))
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        # torch's launcher starts N copies of this same command (without --nproc-per-node)
        cleaned = ["run", args.spec, "--out", out, "--resume", args.resume, "--device", args.device]
        if args.smoke:
            cleaned.append("--smoke")
        if args.no_size_check:
            cleaned.append("--no-size-check")
        if branch is not None:
            cleaned += ["--from", branch.url]
        for item in args.overrides:
            cleaned += ["--set", item]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc_per_node}", "-m", "vermeer_core", *cleaned]
        return subprocess.call(cmd)
    from vermeer_core.distributed import init_distributed, shutdown
    from vermeer_core.engine import Engine

    d = init_distributed(device=args.device, replicate=spec.train.replicate)
    try:
        Engine(spec, plugins, out, d, resume=args.resume, branch=branch).run()
    finally:
        shutdown()
    if d.rank == 0:
        print(f"done: {out}")
    return 0


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _cmd_sample(args: argparse.Namespace) -> int:
    from vermeer_core.inference import load_model
    from vermeer_core.sampling import generate, save_grid, save_png

    registry = get_plugins().registry
    spec, model, stage = load_model(args.checkpoint, registry, verify=args.verify)
    device = _device(args.device)
    model.to(device)
    sampler_ref = spec.sampling.sampler
    if args.sampler:
        sampler_ref = registry.parse("sampler", {"type": args.sampler})
    images = generate(
        model, args.prompt, spec=spec, schedule=registry.build(spec.diffusion.schedule, "noise_schedule"),
        sampler=registry.build(sampler_ref, "sampler"), resolution=model.resolution, device=device,
        steps=args.steps, guidance=args.guidance, seed=args.seed, grid=args.grid,
    )
    if len(args.prompt) == 1:
        save_png(images[0], args.out)
    else:
        save_grid(images, args.prompt, args.out)
    print(f"wrote {args.out} ({len(args.prompt)} image(s), {model.resolution}px, stage {stage})")
    return 0


def _eval_out(checkpoint: str, verify: bool = True) -> str:
    """Default output of ``vermeer eval``: ``<run>/eval/<step-N>`` for a checkpoint or run dir,
    ``<file>-eval`` beside an exported ``.safetensors``."""
    import posixpath

    from vermeer_core.inference import resolve_checkpoint
    from vermeer_core.io import join

    if checkpoint.endswith(".safetensors"):
        return checkpoint[: -len(".safetensors")] + "-eval"
    url = resolve_checkpoint(checkpoint, verify=verify).rstrip("/")
    parent, name = posixpath.split(url)
    run = posixpath.dirname(parent) if posixpath.basename(parent) == "checkpoints" else parent
    return join(run, "eval", name)


def _cmd_eval(args: argparse.Namespace) -> int:
    from vermeer_core.evaluation import evaluate, write_result
    from vermeer_core.inference import load_model
    from vermeer_core.io import join
    from vermeer_core.spec import DEFAULT_METRICS, SpecError

    registry = get_plugins().registry
    for name, value in (("--prompts", args.prompts), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise SpecError("command line", [(name, f"must be >= 1, got {value}")])
    if args.seed is not None and args.seed < 0:
        raise SpecError("command line", [("--seed", f"must be >= 0, got {args.seed}")])
    metrics = []
    for name in args.metric or []:
        if name not in registry.names("metric"):
            raise SpecError("command line", [("--metric", f"unknown metric {name!r}; registered: {registry.names('metric')}")])
        metrics.append(registry.parse("metric", {"type": name}))
    out = args.out or _eval_out(args.checkpoint, args.verify)
    spec, model, stage = load_model(args.checkpoint, registry, verify=args.verify)
    e = spec.eval
    device = _device(args.device)
    model.to(device)
    n = args.prompts or (e.prompts if e else 64)
    seed = args.seed if args.seed is not None else (e.seed if e else 1234)
    result = evaluate(
        model, spec=spec, registry=registry, metrics=metrics or (e.metrics if e else list(DEFAULT_METRICS)), n=n,
        seed=seed, resolution=model.resolution, schedule=registry.build(spec.diffusion.schedule, "noise_schedule"),
        sampler=registry.build(spec.sampling.sampler, "sampler"), device=device,
        steps=args.steps or (e.steps if e else None),
        guidance=args.guidance if args.guidance is not None else (e.guidance if e else None),
        batch_size=e.batch_size if e else 16,
    )
    assert result is not None  # one process: rank 0
    info = {"checkpoint": args.checkpoint, "stage": stage, "resolution": model.resolution, "seed": seed}
    write_result(result, join(out, "eval.json"), join(out, "grid.png"), info)
    for k, v in result.metrics.items():
        print(f"{k}: {v:.4g}")
    print(f"wrote {join(out, 'eval.json')} and {join(out, 'grid.png')} ({n} held-out prompts, {model.resolution}px, stage {stage})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vermeer_core.inference import export_safetensors

    info = export_safetensors(args.checkpoint, args.out, get_plugins().registry, verify=args.verify)
    print(f"wrote {args.out}: {info['tensors']} tensors, stage {info['stage']}, {info['resolution']}px")
    return 0


def entry() -> None:
    """The ``vermeer`` console script and ``python -m vermeer_core``: :func:`main`, then the end
    of the process. A process that joined a process group (``vermeer run``, torchrun's workers
    included) ends through :func:`vermeer_core.distributed.end_process` (why: its docstring)."""
    code = main()
    if "vermeer_core.distributed" in sys.modules:
        from vermeer_core.distributed import end_process

        end_process(code)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except VermeerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - only a full disk becomes a message; the rest re-raised
        from vermeer_core.io import disk_full, disk_full_message

        full = disk_full(exc)
        if full is None:
            raise
        print(f"error: {disk_full_message(full, getattr(args, 'out', None))}", file=sys.stderr)
        return 1
