"""Webdataset tar shards on any fsspec filesystem: find, read, decode, write and inspect them.

Shared by the built-in data plugins (``webdataset`` reads shards, ``synthetic`` and
``from-folder`` write them); it lives with the plugins, not in ``vermeer_core``, because only
they use tar shards. It imports nothing from vermeer but :mod:`vermeer_core.api`.

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
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from braceexpand import braceexpand
from PIL import Image

from vermeer_core.api import LOCAL_PROTOCOLS, DataError, is_local_fs, is_local_url, save_grid, storage_errors

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "ImageTooLarge",
    "ImageTooSmall",
    "RawSample",
    "ShardError",
    "encode_image",
    "fsspec_gopen",
    "inspect_shards",
    "iter_shard",
    "load_image",
    "open_shard",
    "register_fsspec_openers",
    "resolve_shards",
    "to_rgb",
    "write_shards",
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
    ``next_offset`` where the following sample starts (reopen there to continue).
    ``oversized`` maps the extensions of members that were over their byte limit (and so not
    read, and absent from ``files``) to their size."""

    key: str
    files: dict[str, bytes]
    offset: int
    next_offset: int
    oversized: dict[str, int] = field(default_factory=dict)


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
    url: str,
    *,
    offset: int = 0,
    storage_options: dict[str, Any] | None = None,
    read_data: bool = True,
    members: Mapping[str, int] | None = None,
) -> Iterator[RawSample]:
    """The samples of shard ``url`` from byte ``offset`` (a sample boundary), in order.

    Raises :class:`ShardError` when the shard cannot be opened or is truncated/damaged; the
    sample being read then (possibly incomplete) is never yielded. ``read_data=False`` yields
    empty bytes for each member (counting without reading image data). ``members`` maps the
    extensions to read to their byte limit: other members are skipped unread (tar headers give
    their size, so nothing is read whole that is not wanted), and a member over its limit is
    recorded in :attr:`RawSample.oversized` instead of being read. None reads every member.
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
            oversized: dict[str, int] = {}
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
                        yield RawSample(key, files, start, member.offset, oversized)
                    key, files, oversized, start = parts[0], {}, {}, member.offset
                ext = parts[1]
                limit = None if members is None else members.get(ext)
                if members is not None and limit is None:
                    continue  # not wanted: tarfile seeks over its data
                if limit is not None and member.size > limit:
                    oversized[ext] = member.size
                    continue
                data = b""
                if read_data:
                    src = tar.extractfile(member)
                    data = src.read() if src is not None else b""
                files[ext] = data
            # tarfile stops silently at a missing or damaged header: only a zero block is a
            # real end of archive. Check it before yielding the last sample, which may be cut.
            where = tar.offset
            f.seek(tar.offset)
            end = f.read(_BLOCK)
            if len(end) < _BLOCK or end.count(0) != _BLOCK:
                raise tarfile.ReadError("no end-of-archive block (truncated or damaged)")
            if key is not None:
                yield RawSample(key, files, start, tar.offset, oversized)
        except (tarfile.TarError, EOFError, ValueError) as exc:
            raise ShardError("truncated_tar", url, where, str(exc) or type(exc).__name__) from exc
        except Exception as exc:  # noqa: BLE001 - I/O failed (after the filesystem's own retries)
            raise ShardError("unreadable_shard", url, where, f"read failed: {type(exc).__name__}: {exc}") from exc


# --- decoding --------------------------------------------------------------------------------
#: Default pixel limit of :func:`load_image`: 8192 x 8192. Above it an image is refused from its
#: header, before any pixel is decoded (a 13000 x 13000 PNG of 20 KB decodes to 500 MB of RGB).
DEFAULT_MAX_PIXELS = 8192 * 8192


class ImageTooLarge(ValueError):
    """The image's header declares more pixels than the limit; nothing was decoded."""


class ImageTooSmall(ValueError):
    """The image's shorter side is below the requested minimum (a filter, not damage)."""


def _scaled_to_uint8(im: Image.Image) -> Image.Image:
    """Single-channel images of more than 8 bits as 8-bit ``L``, scaled (PIL's own conversion
    clips every value above 255 to white). 16-bit modes (``I;16*``, and ``I``, which PIL uses for
    16-bit PNG/TIFF greyscale) map 0..65535 to 0..255; float ``F`` maps 0..1 to 0..255 (the
    convention of float TIFF/EXR-derived files), values outside are clipped."""
    a = np.asarray(im)
    if im.mode == "F":
        scaled = np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0
    else:
        scaled = np.clip(a.astype(np.float32), 0.0, 65535.0) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``im`` as 8-bit RGB: high-bit-depth modes scaled (not clipped), transparency (``RGBA``,
    ``LA``, ``PA``, ``P`` with a transparent index, premultiplied ``RGBa``/``La``) composited over
    ``background`` (otherwise hidden colour under alpha 0 shows), ``CMYK``/``YCbCr``/``1``/``L``
    by PIL's conversion."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _scaled_to_uint8(im).convert("RGB")
    if im.mode in ("La", "RGBa"):
        im = im.convert("RGBA")  # un-premultiply
    if im.mode == "P" and "transparency" in im.info or im.mode in ("LA", "PA", "RGBA"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(
    data: bytes, resolution: int, *, draft: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = 0,
) -> np.ndarray:
    """Decode an image, centre-crop the largest square and scale it to ``resolution``:
    (R, R, 3) uint8 RGB (modes converted by :func:`to_rgb`).

    The header is checked before any pixel is decoded: more than ``max_pixels`` pixels (None:
    no limit) raises :class:`ImageTooLarge`, a shorter side below ``min_size`` raises
    :class:`ImageTooSmall`. Scaling is antialiased bicubic (the filter's support widens with
    the reduction, so downscaling does not alias), done by torch's vectorised uint8 kernel: the
    same result as PIL's ``BICUBIC`` resize to within 2 levels, several times faster. With
    ``draft``, a JPEG is first decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still
    covers the target: much faster for large photos, and a DCT-domain reduction is itself an
    area average.
    """
    try:
        with warnings.catch_warnings():  # PIL warns above its own limit; ours is max_pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own limit (2x its MAX_IMAGE_PIXELS)
        raise ImageTooLarge(str(exc)) from None
    with im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
        if min(w, h) < min_size:
            raise ImageTooSmall(f"{w}x{h} is smaller than the minimum side {min_size}")
        if draft and im.format == "JPEG" and min(w, h) > resolution:
            scale = resolution / min(w, h)
            im.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
            w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        square = im.crop((left, top, left + side, top + side)) if w != h else im
        pixels = np.array(to_rgb(square))  # a writable (side, side, 3) copy
    if side == resolution:
        return pixels
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # NCHW view of channels-last memory
    out = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True)
    return out[0].permute(1, 2, 0).numpy()


# --- writing ---------------------------------------------------------------------------------
#: extension -> (PIL format, save options) of the images vermeer writes
IMAGE_FORMATS = {"png": ("PNG", {"compress_level": 3}), "jpg": ("JPEG", {"quality": 95}),
                 "webp": ("WEBP", {"quality": 95})}


def encode_image(image: np.ndarray, ext: str) -> bytes:
    """(3, R, R) float in [-1, 1] -> encoded image bytes."""
    hwc = np.clip(np.rint((image.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    fmt, opts = IMAGE_FORMATS[ext]
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, format=fmt, **opts)
    return buf.getvalue()


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else by the
    set-and-restore dance."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _publish(tmp: str, fs: fsspec.AbstractFileSystem, path: str, local: bool) -> None:
    """Move the finished local file ``tmp`` to ``path`` on ``fs``: a rename on local disks (with
    the permissions a plain ``open`` would give: ``mkstemp`` makes 0600), one upload to object
    stores (where an object appears only once its upload completes)."""
    if local:
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    else:
        fs.put_file(tmp, path)


def write_shards(
    out: str,
    samples: Iterable[dict[str, Any]],
    *,
    shard_size: int = 1000,
    name: str = "shard-{:06d}.tar",
    progress: Callable[[str, int], None] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Write ``samples`` (webdataset dicts: ``__key__`` plus extension -> bytes) into shards of
    ``shard_size`` samples named ``out/<name.format(i)>``, with webdataset's ``TarWriter``.

    Each shard is written to a temporary file and appears under its final name only when
    complete (a rename on local disks, one upload to object stores). Returns the shard URLs;
    ``progress(url, samples_so_far)`` is called after each shard.
    """
    from webdataset import TarWriter

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    local = is_local_url(out)
    fs, root = fsspec.core.url_to_fs(out, **({} if local else storage_options or {}))
    with storage_errors(out, "create the output directory"):
        fs.makedirs(root, exist_ok=True)
    tmp_dir = root if local else None  # beside the final name, so the rename is atomic
    urls: list[str] = []
    done = 0
    it = iter(samples)
    while True:
        first = next(it, None)
        if first is None:
            break
        url = posixpath.join(out.rstrip("/"), name.format(len(urls)))
        fd, tmp = tempfile.mkstemp(prefix=f".{posixpath.basename(url)}.{uuid.uuid4().hex[:8]}.", suffix=".tmp",
                                   dir=tmp_dir)
        try:
            # mtime an int: a float would cost a pax header before every member
            with os.fdopen(fd, "wb") as f, TarWriter(f, encoder=False, mtime=0) as writer:
                writer.write(first)
                done += 1
                for _ in range(shard_size - 1):
                    sample = next(it, None)
                    if sample is None:
                        break
                    writer.write(sample)
                    done += 1
            with storage_errors(url, "write"):
                _publish(tmp, fs, posixpath.join(root, posixpath.basename(url)), local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        urls.append(url)
        if progress is not None:
            progress(url, done)
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
                except ImageTooLarge:
                    problems["oversized_image"] += 1
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
        images = torch.from_numpy(np.stack(thumbs)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        save_grid(images, captions, contact_sheet)
        report["contact_sheet"] = contact_sheet
    return report
