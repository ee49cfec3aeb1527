"""Webdataset tar shards on any fsspec filesystem: find, read, decode, write and inspect them.

A shard is an uncompressed tar whose members ``<key>.<ext>`` form samples: consecutive members
with the same key (webdataset's convention), e.g. ``00000042.png`` + ``00000042.txt``. Reading
goes through fsspec (local paths, ``memory://``, ``gs://`` via gcsfs, ...), never through
webdataset's default ``gs://`` opener, which shells out to ``gsutil``.

The reader records each sample's byte offset, so a reader can be reopened at any sample
boundary (the ``webdataset`` dataset resumes that way), and it tells a damaged tar from a
complete one: Python's :mod:`tarfile` silently treats a bad or missing header after the first
as the end of the archive, so the end-of-archive block is checked explicitly.
"""

from __future__ import annotations

import importlib
import io
import math
import os
import posixpath
import tarfile
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from braceexpand import braceexpand
from PIL import Image

from vermeer_core.errors import DataError
from vermeer_core.io import LOCAL_PROTOCOLS, is_local_fs, is_local_url, storage_errors

__all__ = [
    "RawSample",
    "ShardError",
    "fsspec_gopen",
    "inspect_shards",
    "iter_shard",
    "load_image",
    "open_shard",
    "register_fsspec_openers",
    "resolve_shards",
    "synth_shards",
]

_BLOCK = 512  # tar block size
_GLOB_CHARS = "*?["
_READ_BLOCK = 4 << 20  # fsspec read-ahead per open remote shard: bounds memory per open file


# --- opening ---------------------------------------------------------------------------------
def fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **storage_options: Any) -> IO[bytes]:
    """An opener with webdataset's ``gopen`` signature that reads/writes through fsspec, so
    credentials, retries and emulators (``STORAGE_EMULATOR_HOST``) work as for any fsspec user."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if mode == "rb":
        return fs.open(path, "rb", block_size=_READ_BLOCK, cache_type="readahead")
    return fs.open(path, mode)


def register_fsspec_openers(schemes: Sequence[str] = ()) -> None:
    """Route every remote scheme webdataset knows (plus ``schemes``) through :func:`fsspec_gopen`.

    Only schemes that fsspec implements are replaced (``pipe:`` stays a shell pipe). Idempotent;
    call it when a dataset is built rather than at import, so importing vermeer has no side
    effects on a user's webdataset.
    """
    # ``webdataset.gopen`` the attribute is the function; the table lives in the module.
    gopen = importlib.import_module("webdataset.gopen")
    known = set(fsspec.available_protocols())
    for scheme in {*gopen.gopen_schemes, *schemes}:
        if scheme in known and scheme not in LOCAL_PROTOCOLS:
            gopen.gopen_schemes[scheme] = fsspec_gopen


def open_shard(url: str, storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """Open ``url`` for reading (seekable): local paths with the built-in ``open``, anything
    else through fsspec."""
    if is_local_url(url):
        return open(fsspec.core.strip_protocol(url), "rb")
    return fsspec_gopen(url, "rb", **(storage_options or {}))


# --- finding shards --------------------------------------------------------------------------
def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if is_local_fs(fs) else fs.unstrip_protocol(path)


def resolve_shards(urls: str | Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Expand shard URLs into the list of shards, in order; every one must exist.

    Each entry may be a brace pattern (``gs://b/train-{000000..000099}.tar``), a glob
    (``data/*.tar``) or a directory/prefix (all ``*.tar`` inside, sorted). Existence is checked
    with one listing per parent directory, not one request per shard. Raises
    :class:`DataError` naming the pattern when nothing matches or shards are missing.
    """
    opts = storage_options or {}
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if not patterns:
        raise DataError("no shard URLs given: set data.urls to a pattern such as 'shards/shard-{000000..000009}.tar'")
    shards: list[str] = []
    for pattern in patterns:
        with storage_errors(pattern, "list the shards of"):  # 403 / network: a message, no traceback
            shards += _resolve(pattern, opts)
    dup = [u for u, c in Counter(shards).items() if c > 1]
    if dup:
        raise DataError(f"shards listed more than once in {patterns!r}: {dup[:3]}; each shard may appear only once")
    return shards


def _resolve(pattern: str, opts: dict[str, Any]) -> list[str]:
    found: list[str] = []
    explicit: list[str] = []
    for url in braceexpand(pattern):
        fs, path = fsspec.core.url_to_fs(url, **({} if is_local_url(url) else opts))
        if any(c in path for c in _GLOB_CHARS):
            found += [_unstrip(fs, p) for p in sorted(fs.glob(path)) if p.endswith(".tar")]
        elif url.endswith("/") or (not path.endswith(".tar") and fs.isdir(path)):
            fs.invalidate_cache(path)
            found += [_unstrip(fs, p) for p in sorted(fs.ls(path, detail=False)) if p.endswith(".tar")]
        else:
            explicit.append(url)
    found += _existing(explicit, pattern, opts)
    if not found:
        raise DataError(f"no shards matched {pattern!r}: check the path/pattern (and credentials for remote URLs)")
    return found


def _existing(urls: list[str], pattern: str, opts: dict[str, Any]) -> list[str]:
    """``urls`` after checking that they all exist, with one listing per parent directory."""
    by_parent: dict[tuple[int, str], list[tuple[str, str]]] = {}
    systems: dict[int, fsspec.AbstractFileSystem] = {}
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **({} if is_local_url(url) else opts))
        systems[id(fs)] = fs
        by_parent.setdefault((id(fs), posixpath.dirname(path)), []).append((url, path))
    missing: list[str] = []
    for (key, parent), items in by_parent.items():
        fs = systems[key]
        fs.invalidate_cache(parent)  # another writer may have added shards since the last listing
        try:
            listed = {fs._strip_protocol(p) for p in fs.ls(parent, detail=False)}
        except (FileNotFoundError, NotADirectoryError):
            listed = set()
        missing += [url for url, path in items if fs._strip_protocol(path) not in listed]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist (e.g. {', '.join(missing[:3])}): "
            "fix the pattern or the data"
        )
    return urls


# --- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RawSample:
    """One sample as stored: ``files`` maps each lower-case extension ("jpg", "txt",
    "seg.png") to its bytes. ``offset`` is the byte offset of its first tar header and
    ``next_offset`` where the following sample starts (reopen there to continue)."""

    key: str
    files: dict[str, bytes]
    offset: int
    next_offset: int


class ShardError(Exception):
    """A shard could not be read (further): ``reason`` is "truncated_tar" (truncated or not a
    valid tar) or "unreadable_shard" (it cannot be opened or reading failed, e.g. missing,
    forbidden, network); samples before ``offset`` were fine."""

    def __init__(self, reason: str, url: str, offset: int, detail: str) -> None:
        super().__init__(f"{url} at byte {offset}: {detail}")
        self.reason = reason
        self.url = url
        self.offset = offset
        self.detail = detail


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's naming: the key is everything before the first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None
    return name[:dot], name[dot + 1 :].lower()


def iter_shard(
    url: str, *, offset: int = 0, storage_options: dict[str, Any] | None = None, read_data: bool = True
) -> Iterator[RawSample]:
    """The samples of shard ``url`` from byte ``offset`` (a sample boundary), in order.

    Raises :class:`ShardError` when the shard cannot be opened or is truncated/damaged; the
    sample being read then (possibly incomplete) is never yielded. ``read_data=False`` yields
    empty bytes for each member (counting without reading image data).
    """
    try:
        f = open_shard(url, storage_options)
    except Exception as exc:  # noqa: BLE001 - missing, forbidden, network, missing gcsfs: all mean the same here
        raise ShardError("unreadable_shard", url, offset, f"cannot open: {type(exc).__name__}: {exc}") from exc
    with f:
        where = offset
        try:
            f.seek(offset)
            tar = tarfile.open(fileobj=f, mode="r:")
            key: str | None = None
            files: dict[str, bytes] = {}
            start = offset
            while (member := tar.next()) is not None:
                where = member.offset
                if not member.isfile():
                    continue
                parts = _split_name(member.name)
                if parts is None or parts[0].startswith("__"):
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield RawSample(key, files, start, member.offset)
                    key, files, start = parts[0], {}, member.offset
                data = b""
                if read_data:
                    src = tar.extractfile(member)
                    data = src.read() if src is not None else b""
                files[parts[1]] = data
            # tarfile stops silently at a missing or damaged header: only a zero block is a
            # real end of archive. Check it before yielding the last sample, which may be cut.
            where = tar.offset
            f.seek(tar.offset)
            end = f.read(_BLOCK)
            if len(end) < _BLOCK or end.count(0) != _BLOCK:
                raise tarfile.ReadError("no end-of-archive block (truncated or damaged)")
            if key is not None:
                yield RawSample(key, files, start, tar.offset)
        except (tarfile.TarError, EOFError, ValueError) as exc:
            raise ShardError("truncated_tar", url, where, str(exc) or type(exc).__name__) from exc
        except Exception as exc:  # noqa: BLE001 - I/O failed (after the filesystem's own retries)
            raise ShardError("unreadable_shard", url, where, f"read failed: {type(exc).__name__}: {exc}") from exc


# --- decoding --------------------------------------------------------------------------------
def load_image(data: bytes, resolution: int, *, draft: bool = True) -> np.ndarray:
    """Decode an image, centre-crop the largest square and scale it to ``resolution``:
    (R, R, 3) uint8 RGB.

    Scaling is antialiased bicubic (the filter's support widens with the reduction, so
    downscaling does not alias), done by torch's vectorised uint8 kernel: the same result as
    PIL's ``BICUBIC`` resize to within 2 levels, several times faster. With ``draft``, a JPEG is
    first decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the target: much
    faster for large photos, and a DCT-domain reduction is itself an area average.
    """
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if draft and im.format == "JPEG" and min(w, h) > resolution:
            scale = resolution / min(w, h)
            im.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
            w, h = im.size
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        square = rgb.crop((left, top, left + side, top + side)) if w != h else rgb
        pixels = np.array(square)  # a writable (side, side, 3) copy
    if side == resolution:
        return pixels
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # NCHW view of channels-last memory
    out = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True)
    return out[0].permute(1, 2, 0).numpy()


# --- writing ---------------------------------------------------------------------------------
_FORMATS = {"png": ("PNG", {"compress_level": 3}), "jpg": ("JPEG", {"quality": 95}), "webp": ("WEBP", {"quality": 95})}


def _encode(image: np.ndarray, ext: str) -> bytes:
    """(3, R, R) float in [-1, 1] -> encoded image bytes."""
    hwc = np.clip(np.rint((image.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    fmt, opts = _FORMATS[ext]
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format=fmt, **opts)
    return buf.getvalue()


def _publish(tmp: str, fs: fsspec.AbstractFileSystem, path: str, local: bool) -> None:
    """Move the finished local file ``tmp`` to ``path`` on ``fs``: a rename on local disks, one
    upload to object stores (where an object appears only once its upload completes)."""
    if local:
        os.replace(tmp, path)
    else:
        fs.put_file(tmp, path)


def synth_shards(
    out: str,
    n: int,
    resolution: int,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    image_format: str = "png",
    progress: Callable[[str, int], None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Write ``n`` synthetic captioned samples as shards ``out/shard-000000.tar``, ...

    Sample ``i`` is the ``synthetic`` dataset's scene ``(seed, i)``: ``<i:08d>.<image_format>``
    (rendered at ``resolution``), ``.txt`` (its exact caption) and ``.json`` (the scene, for
    :func:`vermeer_plugins.synthetic.score`). Each shard is written to a temporary file and
    appears under its final name only when complete. Returns the shard URLs;
    ``progress(url, samples_so_far)`` is called after each shard; ``storage_options`` go to
    fsspec for a remote ``out``.
    """
    import dataclasses
    import json

    from webdataset import TarWriter

    from vermeer_plugins.synthetic import caption, render, scene

    if n < 1 or resolution < 1 or shard_size < 1:
        raise ValueError(f"synth: n, resolution and shard_size must be >= 1, got {n}, {resolution}, {shard_size}")
    if image_format not in _FORMATS:
        raise ValueError(f"synth: image_format must be one of {sorted(_FORMATS)}, got {image_format!r}")
    local = is_local_url(out)
    fs, root = fsspec.core.url_to_fs(out, **({} if local else storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    # Local output: the temporary file lives beside its final name so the rename is atomic.
    tmp_dir = root if local else None
    urls: list[str] = []
    for first in range(0, n, shard_size):
        url = posixpath.join(out.rstrip("/"), f"shard-{first // shard_size:06d}.tar")
        prefix = f".{posixpath.basename(url)}.{uuid.uuid4().hex[:8]}."
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=tmp_dir)
        try:
            # mtime an int: a float would cost a pax header before every member
            with os.fdopen(fd, "wb") as f, TarWriter(f, encoder=False, mtime=0) as writer:
                for i in range(first, min(n, first + shard_size)):
                    s = scene(seed, i)
                    writer.write({
                        "__key__": f"{i:08d}",
                        image_format: _encode(render(s, resolution), image_format),
                        "txt": caption(s).encode(),
                        "json": json.dumps(dataclasses.asdict(s)).encode(),
                    })
            _publish(tmp, fs, posixpath.join(root, posixpath.basename(url)), local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        urls.append(url)
        if progress is not None:
            progress(url, min(n, first + shard_size))
    return urls


# --- inspecting ------------------------------------------------------------------------------
_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def inspect_shards(
    urls: str | Sequence[str],
    *,
    n: int = 16,
    contact_sheet: str | None = None,
    thumb: int = 128,
    max_shards: int | None = None,
    caption_key: str = "txt",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read shards and summarise them: shard and sample counts, image sizes and formats,
    the first ``n`` captions and problems by reason. With ``contact_sheet``, the first ``n``
    images (centre-cropped to ``thumb`` px) go to that PNG URL, their captions beside it
    (``.txt``)."""
    shards = resolve_shards(urls, storage_options)[:max_shards]
    samples = 0
    sizes: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    bad_shards: dict[str, str] = {}
    captions: list[str] = []
    thumbs: list[np.ndarray] = []
    for url in shards:
        try:
            for raw in iter_shard(url, storage_options=storage_options):
                samples += 1
                ext = next((k for k in _IMAGE_KEYS if k in raw.files), None)
                text = raw.files.get(caption_key)
                if ext is None:
                    problems["missing_image"] += 1
                    continue
                if not text or not text.strip():
                    problems["missing_caption"] += 1
                try:
                    with Image.open(io.BytesIO(raw.files[ext])) as im:
                        sizes[f"{im.size[0]}x{im.size[1]}"] += 1
                        formats[im.format or ext] += 1
                    if len(thumbs) < n:
                        thumbs.append(load_image(raw.files[ext], thumb))
                        captions.append(text.decode("utf-8", "replace").strip() if text else "")
                except Exception:  # noqa: BLE001 - any decoder failure means the same to the user
                    problems["undecodable_image"] += 1
        except ShardError as exc:
            problems[exc.reason] += 1
            bad_shards[url] = exc.detail
    report: dict[str, Any] = {
        "shards": len(shards),
        "samples": samples,
        "sizes": dict(sizes.most_common()),
        "formats": dict(formats.most_common()),
        "problems": dict(problems),
        "damaged_shards": bad_shards,
        "captions": captions,
    }
    if contact_sheet is not None and thumbs:
        from vermeer_core.sampling import save_grid

        images = torch.from_numpy(np.stack(thumbs)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        save_grid(images, captions, contact_sheet)
        report["contact_sheet"] = contact_sheet
    return report
