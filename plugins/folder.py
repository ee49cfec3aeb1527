"""A folder of captioned images as webdataset shards (``vermeer data from-folder``).

Captions come from each image's same-named ``.txt`` (``cat.jpg`` + ``cat.txt``), or from one
CSV/JSONL file of ``path,caption`` rows (paths relative to the folder). Image bytes are stored
as they are (no re-encoding, so no quality loss), under the extension of their actual format,
keyed ``000000000``, ``000000001``, ... in sorted path order (the layout img2dataset writes);
a ``.json`` member keeps the source path and size. Whatever cannot be used is skipped and
reported by reason, never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vermeer_core.api import DataError
from vermeer_plugins.shards import DEFAULT_MAX_PIXELS, write_shards

__all__ = ["IMAGE_SUFFIXES", "FolderReport", "folder_shards", "read_caption_table"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> member extension
MAX_CAPTION_BYTES = 64 << 10
MAX_IMAGE_BYTES = 64 << 20
MAX_TABLE_BYTES = 1 << 30


@dataclass
class FolderReport:
    """What was written: shard URLs, samples, and skipped source paths by reason."""

    shards: list[str] = field(default_factory=list)
    written: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, path: str) -> None:
        self.skipped.setdefault(reason, []).append(path)


def read_caption_table(path: str | Path) -> dict[str, str]:
    """``relative path -> caption`` from a ``.csv`` (header with ``path`` and ``caption``) or a
    ``.jsonl`` (one object with ``path`` and ``caption`` per line). A malformed file raises
    :class:`DataError` naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--captions {str(p)!r}: no such file")
    if p.stat().st_size > MAX_TABLE_BYTES:
        raise DataError(f"--captions {str(p)!r}: {p.stat().st_size} bytes is over the {MAX_TABLE_BYTES} byte limit")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"--captions {str(p)!r} is not UTF-8 text ({exc})") from None
    table: dict[str, str] = {}
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise DataError(f"--captions {str(p)!r}: the first line must be a header naming the columns path,caption "
                            f"(got {reader.fieldnames})")
        rows: Iterator[tuple[int, Any]] = ((reader.line_num, row) for row in reader)
    elif p.suffix.lower() == ".jsonl":
        def parse() -> Iterator[tuple[int, Any]]:
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"--captions {str(p)!r} line {n}: not JSON ({exc.msg})") from None

        rows = parse()
    else:
        raise DataError(f"--captions {str(p)!r}: expected a .csv or .jsonl file")
    for n, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not isinstance(row.get("caption"), str):
            raise DataError(f"--captions {str(p)!r} line {n}: expected a path and a caption (strings), got {row!r}")
        table[Path(row["path"]).as_posix()] = row["caption"]
    return table


def _caption_beside(image: Path, report: FolderReport, rel: str) -> str | None:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        report.skip("missing_caption", rel)
        return None
    if txt.stat().st_size > MAX_CAPTION_BYTES:
        report.skip("oversized_caption", rel)
        return None
    try:
        return txt.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        report.skip("undecodable_caption", rel)
        return None


def folder_shards(
    folder: str | Path,
    out: str,
    *,
    captions: str | Path | None = None,
    shard_size: int = 1000,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[str, int], None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> FolderReport:
    """Write the captioned images under ``folder`` as shards ``out/shard-000000.tar``, ...
    (see the module docstring). Raises :class:`DataError` when the folder does not exist or
    holds no usable captioned image."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"from-folder: {str(root)!r} is not a directory")
    table = read_caption_table(captions) if captions is not None else None
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    report = FolderReport()
    if table is not None:
        listed = {p.relative_to(root).as_posix() for p in images}
        for rel in sorted(set(table) - listed):
            report.skip("missing_image", rel)

    def samples() -> Iterator[dict[str, Any]]:
        for image in images:
            rel = image.relative_to(root).as_posix()
            if table is not None:
                if rel not in table:
                    report.skip("missing_caption", rel)
                    continue
                caption: str | None = table[rel]
            else:
                caption = _caption_beside(image, report, rel)
            if caption is None:
                continue
            if not caption.strip():
                report.skip("missing_caption", rel)
                continue
            if image.stat().st_size > MAX_IMAGE_BYTES:
                report.skip("oversized_image", rel)
                continue
            data = image.read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as im:
                    fmt, (w, h) = im.format, im.size
            except Exception:  # noqa: BLE001 - any decoder failure means the same: not an image
                report.skip("undecodable_image", rel)
                continue
            if fmt not in _EXT:
                report.skip("unsupported_format", rel)
                continue
            if w * h > max_pixels:
                report.skip("oversized_image", rel)
                continue
            key = f"{report.written:09d}"
            report.written += 1
            meta = {"key": key, "path": rel, "width": w, "height": h}
            yield {"__key__": key, _EXT[fmt]: data, "txt": caption.strip().encode(), "json": json.dumps(meta).encode()}

    report.shards = write_shards(out, samples(), shard_size=shard_size, progress=progress,
                                 storage_options=storage_options)
    if report.written == 0:
        why = "; ".join(f"{k}: {len(v)}" for k, v in sorted(report.skipped.items())) or "no image files"
        raise DataError(f"from-folder: no usable captioned image in {str(root)!r} ({why}); images need a same-named "
                        ".txt caption or a row in --captions")
    return report
