"""``vermeer data`` actions of the built-in data plugins: ``synth`` (contributed by
``synthetic``), ``inspect`` and ``from-folder`` (by ``webdataset``), through the
``vermeer_data_commands`` hook. Each ``add_*`` adds one action to the ``data`` sub-parsers;
the work is imported inside the handler, so building the CLI stays cheap."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["add_from_folder", "add_inspect", "add_synth", "at_least"]


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an int >= ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_positive = at_least(1)


def _progress(total: int | None) -> Callable[[str, int], None]:
    def report(url: str, done: int) -> None:
        print(f"wrote {url} ({done}{f'/{total}' if total else ''} samples)", file=sys.stderr)

    return report


# --- synth -------------------------------------------------------------------------------------
def _cmd_synth(args: argparse.Namespace) -> int:
    from vermeer_plugins.synthetic_shards import synth_shards

    urls = synth_shards(args.out, args.n, args.resolution, shard_size=args.shard_size, seed=args.seed,
                        image_format=args.format, progress=_progress(args.n))
    print(f"{len(urls)} shards, {args.n} samples at {args.resolution}px in {args.out}")
    return 0


def add_synth(subparsers: Any) -> None:
    p = subparsers.add_parser("synth", help="write synthetic captioned shards (shard-000000.tar, ...) to any fsspec URL")
    p.add_argument("--out", required=True, help="output directory or URL (local, gs://, memory://)")
    p.add_argument("--n", type=_positive, required=True, help="number of samples")
    p.add_argument("--resolution", type=_positive, required=True, help="image side in pixels")
    p.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=at_least(0), default=0, help="scene seed (sample i is the synthetic scene (seed, i))")
    p.add_argument("--format", choices=("png", "jpg", "webp"), default="png", help="image encoding (default png)")
    p.set_defaults(func=_cmd_synth)


# --- inspect -----------------------------------------------------------------------------------
def _cmd_inspect(args: argparse.Namespace) -> int:
    from vermeer_plugins.shards import inspect_shards

    report: dict[str, Any] = inspect_shards(args.url, n=args.n, contact_sheet=args.contact_sheet,
                                            max_shards=args.max_shards)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['shards']} shards, {report['samples']} samples")
    sizes = report["sizes"]
    top = ", ".join(f"{k} ({v})" for k, v in list(sizes.items())[:8])
    print(f"image sizes: {top}{' ...' if len(sizes) > 8 else ''}")
    print("formats: " + ", ".join(f"{k} ({v})" for k, v in report["formats"].items()))
    problems = report["problems"]
    print("problems: " + (", ".join(f"{k} {v}" for k, v in sorted(problems.items())) or "none"))
    for url, detail in report["damaged_shards"].items():
        print(f"  damaged: {url}: {detail}")
    print("captions:")
    for text in report["captions"]:
        print(f"  {text}")
    if "contact_sheet" in report:
        print(f"contact sheet: {report['contact_sheet']}")
    return 0


def add_inspect(subparsers: Any) -> None:
    p = subparsers.add_parser("inspect", help="count samples, image sizes, captions; optional contact sheet")
    p.add_argument("url", help="shard pattern ('dir/shard-{000000..000009}.tar'), glob, or directory")
    p.add_argument("--contact-sheet", metavar="PNG", help="write the first --n images as a grid PNG (+ .txt captions)")
    p.add_argument("--n", type=_positive, default=16, help="captions to print / images in the sheet (default 16)")
    p.add_argument("--max-shards", type=_positive, help="read only the first N shards")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_inspect)


# --- from-folder -------------------------------------------------------------------------------
def _cmd_from_folder(args: argparse.Namespace) -> int:
    from vermeer_plugins.folder import folder_shards

    report = folder_shards(args.dir, args.out, captions=args.captions, shard_size=args.shard_size,
                           progress=_progress(None))
    print(f"{len(report.shards)} shards, {report.written} samples in {args.out}")
    for reason, paths in sorted(report.skipped.items()):
        print(f"skipped {len(paths)} ({reason}): {', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''}")
    return 0


def add_from_folder(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "from-folder", help="write shards from a folder of images with captions (same-named .txt, or --captions)"
    )
    p.add_argument("dir", help="folder of images (.jpg/.jpeg/.png/.webp, searched recursively)")
    p.add_argument("--out", required=True, help="output directory or URL (local, gs://, memory://)")
    p.add_argument("--captions", metavar="FILE",
                   help="a .csv (header: path,caption) or .jsonl ({\"path\": ..., \"caption\": ...} per line); paths "
                   "relative to DIR. Default: each image's same-named .txt")
    p.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard (default 1000)")
    p.set_defaults(func=_cmd_from_folder)
