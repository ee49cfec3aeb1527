"""Image decoding of real files in every PIL mode (scaled, not clipped), the pixel limit that
refuses decompression bombs before decoding, member size limits, and shard permissions."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset import TarWriter

from vermeer_plugins import shards
from vermeer_plugins.shards import ImageTooLarge, ImageTooSmall, iter_shard, load_image, to_rgb
from vermeer_plugins.synthetic_shards import synth_shards
from vermeer_plugins.webdataset import WebDatasetConfig, build_webdataset


def encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def grey16() -> np.ndarray:
    return (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000


def test_16bit_png_is_scaled_not_clipped():
    a = grey16()
    data = encode(Image.fromarray(a))
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I")  # a real 16-bit file as PIL opens it
    out = load_image(data, 8)
    expect = np.rint(a / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expect)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert out.max() == 245 and len(np.unique(out)) == 64  # PIL's convert("RGB") gives 255 for 63 of 64


@pytest.mark.parametrize("mode", ["I", "I;16", "I;16B"])
def test_other_16bit_modes_are_scaled(mode):
    a = grey16()
    im = Image.fromarray(a.astype(np.int32), mode="I") if mode == "I" else Image.fromarray(a).convert(mode) \
        if mode != "I;16B" else Image.frombytes("I;16B", (8, 8), a.astype(">u2").tobytes())
    assert im.mode == mode
    np.testing.assert_array_equal(np.asarray(to_rgb(im))[..., 1], np.rint(a / 257.0).astype(np.uint8))


def test_float_tiff_maps_unit_range():
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    data = encode(Image.fromarray(a, mode="F"), "TIFF")
    out = load_image(data, 8)
    np.testing.assert_array_equal(out[..., 0], np.rint(a * 255).astype(np.uint8))


def test_transparency_is_composited_over_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # hidden red under alpha 0 must not show
    rgba[:4, :, 3] = 255  # top half opaque red
    out = load_image(encode(Image.fromarray(rgba, "RGBA")), 8)
    assert (out[:4] == [200, 0, 0]).all() and (out[4:] == 255).all()
    la = Image.fromarray(np.stack([np.full((8, 8), 10, np.uint8), np.where(np.arange(8) < 4, 255, 0)
                                   .astype(np.uint8)[None].repeat(8, 0)], -1), "LA")
    out = load_image(encode(la), 8)
    assert (out[:, :4] == 10).all() and (out[:, 4:] == 255).all()
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(0, (0, 0, 8, 4))
    p.info["transparency"] = 0
    out = load_image(encode(p), 8)
    assert (out[:4] == 255).all() and (out[4:] == [0, 0, 255]).all()


def test_cmyk_jpeg_converts():
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(encode(im, "JPEG"), 16)
    assert out.shape == (16, 16, 3) and out[..., 0].min() > 200 and out[..., 1:].max() < 60


def test_decompression_bomb_is_refused_from_its_header():
    data = encode(Image.new("1", (13000, 13000)))  # 169 Mpx in about 20 KB
    assert len(data) < 100_000
    t = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="13000x13000"):
        load_image(data, 32)
    assert time.perf_counter() - t < 0.5  # nothing decoded
    with pytest.raises(ImageTooLarge):
        load_image(encode(Image.new("L", (100, 100))), 32, max_pixels=9999)
    assert load_image(encode(Image.new("L", (100, 100))), 32, max_pixels=10000).shape == (32, 32, 3)
    with pytest.raises(ImageTooSmall):
        load_image(encode(Image.new("L", (100, 40))), 32, min_size=41)


class CountingFile(io.FileIO):
    read_bytes = 0

    def read(self, *a):
        out = super().read(*a)
        CountingFile.read_bytes += len(out)
        return out

    def readinto(self, b):
        n = super().readinto(b)
        CountingFile.read_bytes += n or 0
        return n


def test_oversized_members_are_never_read(tmp_path, monkeypatch):
    path = tmp_path / "big.tar"
    with TarWriter(str(path), encoder=False, mtime=0) as w:
        w.write({"__key__": "a", "png": encode(Image.new("RGB", (4, 4))), "txt": b"x" * (8 << 20), "json": b"{}"})
        w.write({"__key__": "b", "png": encode(Image.new("RGB", (4, 4))), "txt": b"ok"})
    monkeypatch.setattr(shards, "open_shard", lambda url, opts=None: CountingFile(url, "rb"))
    samples = list(iter_shard(str(path), members={"png": 1 << 20, "txt": 1000}))
    assert [s.key for s in samples] == ["a", "b"]
    assert samples[0].oversized == {"txt": 8 << 20} and set(samples[0].files) == {"png"}
    assert samples[1].files["txt"] == b"ok" and not samples[1].oversized
    assert CountingFile.read_bytes < 1 << 20  # the 8 MB caption was skipped by seeking


def test_stream_counts_bombs_and_oversized_members_as_corrupt(tmp_path):
    good = encode(Image.new("RGB", (16, 16), (9, 9, 9)))
    with TarWriter(str(tmp_path / "s0.tar"), encoder=False, mtime=0) as w:
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        w.write({"__key__": "bomb", "png": encode(Image.new("1", (5000, 5000))), "txt": b"bomb"})
        w.write({"__key__": "long", "png": good, "txt": b"y" * 5000})
        w.write({"__key__": "huge", "png": encode(Image.fromarray(noise)), "txt": b"huge member"})
        w.write({"__key__": "tiny", "png": encode(Image.new("RGB", (8, 8))), "txt": b"small"})
        for i in range(6):
            w.write({"__key__": f"{i:03d}", "png": good, "txt": b"fine"})
    cfg = WebDatasetConfig(urls=str(tmp_path), workers=0, shuffle_buffer=1, max_pixels=1_000_000,
                           max_caption_bytes=1000, max_image_bytes=5000, min_image_size=12)
    ds = build_webdataset(cfg, resolution=16, batch_size=2, rank=0, world_size=1, seed=0)
    it = iter(ds)
    batches = [next(it) for _ in range(3)]
    assert all(c == "fine" for b in batches for c in b.captions)
    st = ds.stats()
    assert (st["oversized_image"], st["oversized_member"], st["filtered_small"]) == (1, 2, 1)
    assert st["corrupt"] == 3 and st["samples_read"] == 10


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_shards_get_the_umasks_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        (url,) = synth_shards(str(tmp_path / "s"), 2, 8, shard_size=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(url).st_mode) == 0o666 & ~umask
    assert tarfile.is_tarfile(url)
