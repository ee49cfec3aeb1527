"""``vermeer data``: write synthetic shards, inspect shards. Wired into the CLI by
:func:`register`; the work is done by :mod:`vermeer_core.datatools`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["register"]


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_positive = _at_least(1)


def _cmd_synth(args: argparse.Namespace) -> int:
    from vermeer_core.datatools import synth_shards

    def progress(url: str, done: int) -> None:
        print(f"wrote {url} ({done}/{args.n} samples)", file=sys.stderr)

    urls = synth_shards(
        args.out, args.n, args.resolution, shard_size=args.shard_size, seed=args.seed,
        image_format=args.format, progress=progress,
    )
    print(f"{len(urls)} shards, {args.n} samples at {args.resolution}px in {args.out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from vermeer_core.datatools import inspect_shards

    report: dict[str, Any] = inspect_shards(
        args.url, n=args.n, contact_sheet=args.contact_sheet, max_shards=args.max_shards
    )
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


def register(subparsers: Any) -> None:
    """Add ``data synth`` and ``data inspect`` to the CLI's subparsers (each sets ``func``)."""
    data = subparsers.add_parser("data", help="write synthetic webdataset shards; inspect shards")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = sub.add_parser("synth", help="write synthetic captioned shards (shard-000000.tar, ...) to any fsspec URL")
    p.add_argument("--out", required=True, help="output directory or URL (local, gs://, memory://)")
    p.add_argument("--n", type=_positive, required=True, help="number of samples")
    p.add_argument("--resolution", type=_positive, required=True, help="image side in pixels")
    p.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--seed", type=_at_least(0), default=0,
                   help="scene seed (sample i is the synthetic scene (seed, i))")
    p.add_argument("--format", choices=("png", "jpg", "webp"), default="png", help="image encoding (default png)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("inspect", help="count samples, image sizes, captions; optional contact sheet")
    p.add_argument("url", help="shard pattern ('dir/shard-{000000..000009}.tar'), glob, or directory")
    p.add_argument("--contact-sheet", metavar="PNG", help="write the first --n images as a grid PNG (+ .txt captions)")
    p.add_argument("--n", type=_positive, default=16, help="captions to print / images in the sheet (default 16)")
    p.add_argument("--max-shards", type=_positive, help="read only the first N shards")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_inspect)
