"""Shard tools (vermeer_plugins.shards): `vermeer data synth` / `inspect`, shard listing, the tar reader,
image decoding, shard writing."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from vermeer_core import data_cli
from vermeer_core.errors import DataError
from vermeer_core.plugins import get_plugins
from vermeer_plugins import synthetic
from vermeer_plugins.shards import (
    ShardError,
    fsspec_gopen,
    inspect_shards,
    iter_shard,
    load_image,
    register_fsspec_openers,
    resolve_shards,
)
from vermeer_plugins.synthetic_shards import synth_shards


def run_cli(*argv: str) -> int:
    """``vermeer data ...`` through :func:`data_cli.register` on a parser of our own."""
    parser = argparse.ArgumentParser(prog="vermeer")
    data_cli.register(parser.add_subparsers(dest="command", required=True), get_plugins().manager)
    args = parser.parse_args(list(argv))
    return args.func(args)


def as_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((image.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    root = f"/t{id(fs)}-{np.random.default_rng().integers(1 << 30)}"
    yield f"memory://{root}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


# --- synth -----------------------------------------------------------------------------------
def test_synth_cli_writes_complete_named_shards_with_exact_content(tmp_path, capsys):
    out = tmp_path / "shards"
    assert run_cli("data", "synth", "--out", str(out), "--n", "7", "--resolution", "20", "--shard-size", "3",
                   "--seed", "5") == 0
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert "3 shards, 7 samples" in capsys.readouterr().out
    samples = [s for url in resolve_shards(str(out)) for s in iter_shard(url)]
    assert [s.key for s in samples] == [f"{i:08d}" for i in range(7)]
    for i, s in enumerate(samples):
        scene = synthetic.scene(5, i)
        assert set(s.files) == {"png", "txt", "json"}
        assert s.files["txt"].decode() == synthetic.caption(scene)
        pixels = np.asarray(Image.open(io.BytesIO(s.files["png"])))
        np.testing.assert_array_equal(pixels, as_uint8(synthetic.render(scene, 20)))  # PNG is lossless
        assert json.loads(s.files["json"])["layout"] == scene.layout


def test_synth_to_memory_url_and_jpg(memfs):
    urls = synth_shards(memfs, 5, 16, shard_size=2, image_format="jpg")
    assert urls == [f"{memfs}/shard-{i:06d}.tar" for i in range(3)]
    assert resolve_shards(memfs + "/shard-{000000..000002}.tar") == urls
    samples = [s for u in urls for s in iter_shard(u)]
    assert len(samples) == 5 and all(set(s.files) == {"jpg", "txt", "json"} for s in samples)
    assert Image.open(io.BytesIO(samples[0].files["jpg"])).format == "JPEG"


def test_synth_shard_appears_only_when_complete(tmp_path, monkeypatch):
    """A failure while writing shard 1 leaves shard 0 complete, no shard 1 and no temp file."""
    render = synthetic.render
    calls = {"n": 0}

    def failing_render(s, resolution):
        calls["n"] += 1
        if calls["n"] == 4:  # the second sample of shard 1
            raise RuntimeError("disk full")
        return render(s, resolution)

    monkeypatch.setattr(synthetic, "render", failing_render)
    with pytest.raises(RuntimeError, match="disk full"):
        synth_shards(str(tmp_path), 6, 8, shard_size=3)
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]
    assert len(list(iter_shard(str(tmp_path / "shard-000000.tar")))) == 3


def test_synth_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_format"):
        synth_shards(str(tmp_path), 2, 8, image_format="gif")
    with pytest.raises(SystemExit):
        run_cli("data", "synth", "--out", str(tmp_path), "--n", "0", "--resolution", "8")


# --- inspect ---------------------------------------------------------------------------------
def test_inspect_counts_sizes_captions_and_contact_sheet(tmp_path, capsys):
    synth_shards(str(tmp_path / "d"), 9, 24, shard_size=4, seed=2)
    sheet = tmp_path / "sheet.png"
    assert run_cli("data", "inspect", str(tmp_path / "d"), "--contact-sheet", str(sheet), "--n", "4") == 0
    out = capsys.readouterr().out
    assert "3 shards, 9 samples" in out and "24x24 (9)" in out and "problems: none" in out
    captions = [synthetic.caption(synthetic.scene(2, i)) for i in range(4)]
    assert all(c in out for c in captions)
    grid = Image.open(sheet)
    assert grid.size == (2 * 128 + 3 * 2, 2 * 128 + 3 * 2)  # 2x2 thumbnails of 128 px, 2 px padding
    assert sheet.with_suffix(".txt").read_text().splitlines()[0] == f"0: {captions[0]}"


def test_inspect_reports_damage(tmp_path):
    urls = synth_shards(str(tmp_path), 6, 16, shard_size=3)
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 2])
    report = inspect_shards(str(tmp_path), n=2)
    assert report["problems"] == {"truncated_tar": 1}
    assert list(report["damaged_shards"]) == [urls[1]]
    assert 3 <= report["samples"] < 6


# --- finding shards --------------------------------------------------------------------------
def test_resolve_patterns_globs_dirs_and_lists(tmp_path):
    urls = synth_shards(str(tmp_path), 4, 8, shard_size=1)
    assert resolve_shards(str(tmp_path) + "/shard-{000000..000003}.tar") == urls
    assert resolve_shards(str(tmp_path) + "/shard-00000[13].tar") == [urls[1], urls[3]]
    assert resolve_shards(str(tmp_path) + "/") == urls
    assert resolve_shards([urls[2], urls[0]]) == [urls[2], urls[0]]


def test_resolve_errors_name_the_pattern(tmp_path, memfs):
    synth_shards(str(tmp_path), 2, 8, shard_size=1)
    pattern = str(tmp_path) + "/shard-{000000..000004}.tar"
    with pytest.raises(DataError, match=r"3 of 5 shards of .*shard-\{000000\.\.000004\}\.tar.* do not exist"):
        resolve_shards(pattern)
    with pytest.raises(DataError, match="no shards matched .*nothing-"):
        resolve_shards(str(tmp_path) + "/nothing-*.tar")
    with pytest.raises(DataError, match="do not exist"):
        resolve_shards(memfs + "/shard-{000000..000001}.tar")
    with pytest.raises(DataError, match="more than once"):
        resolve_shards([pattern.replace("000004", "000001"), str(tmp_path / "shard-000000.tar")])


# --- reading ---------------------------------------------------------------------------------
def test_reader_reopens_at_any_sample_offset(tmp_path):
    (url,) = synth_shards(str(tmp_path), 5, 8, shard_size=5)
    samples = list(iter_shard(url))
    for i, s in enumerate(samples):
        again = list(iter_shard(url, offset=s.offset))
        assert [a.key for a in again] == [x.key for x in samples[i:]]
        assert again[0].files == s.files
    assert list(iter_shard(url, offset=samples[-1].next_offset)) == []


def test_reader_detects_truncation_at_every_cut(tmp_path):
    """However a shard is cut, the reader raises `truncated_tar` and only yields complete
    samples (a prefix of the shard's), never one missing a member."""
    (url,) = synth_shards(str(tmp_path), 3, 8, shard_size=3)
    data = Path(url).read_bytes()
    full = list(iter_shard(url))
    end = full[-1].next_offset + 512  # after the first zero block the archive is complete
    cut_path = tmp_path / "cut.tar"
    for cut in range(0, end, 97):
        cut_path.write_bytes(data[:cut])
        got = []
        with pytest.raises(ShardError) as info:
            for s in iter_shard(str(cut_path)):
                got.append(s)
        assert info.value.reason == "truncated_tar" and str(cut_path) in str(info.value)
        assert [g.files for g in got] == [f.files for f in full[: len(got)]]


def test_reader_unreadable_shard(tmp_path):
    with pytest.raises(ShardError) as info:
        list(iter_shard(str(tmp_path / "gone.tar")))
    assert info.value.reason == "unreadable_shard"


def test_fsspec_openers_replace_remote_schemes_only(memfs):
    import webdataset.gopen  # noqa: F401 - the module, for its table

    table = sys.modules["webdataset.gopen"].gopen_schemes
    pipe = table["pipe"]
    register_fsspec_openers(["memory"])
    assert table["gs"] is fsspec_gopen and table["memory"] is fsspec_gopen and table["pipe"] is pipe
    with fsspec.open(memfs + "/x.bin", "wb") as f:
        f.write(b"hello")
    with sys.modules["webdataset.gopen"].gopen(memfs + "/x.bin", "rb") as f:
        assert f.read() == b"hello"


# --- decoding --------------------------------------------------------------------------------
def _encoded(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    im = Image.fromarray(pixels)
    if mode is not None:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_load_image_resizes_shorter_side_and_centre_crops():
    # 60 x 30 (w x h): red | green | blue thirds; the centred square is the middle half.
    wide = np.zeros((30, 60, 3), np.uint8)
    wide[:, :20, 0] = wide[:, 20:40, 1] = wide[:, 40:, 2] = 255
    out = load_image(_encoded(wide), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    # crop spans x in [15, 45): 1/6 red, 2/3 green, 1/6 blue -> scaled to 10 px
    assert out[:, 4:6, 1].min() == 255 and out[:, 4:6, [0, 2]].max() == 0
    assert out[:, 0, 0].min() > 100 and out[:, -1, 2].min() > 100
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
    np.testing.assert_array_equal(load_image(_encoded(tall), 10), out.transpose(1, 0, 2))


def test_load_image_converts_modes_and_upscales():
    grey = np.full((8, 8, 3), 77, np.uint8)
    for mode in ("L", "RGBA", "P"):
        out = load_image(_encoded(grey, mode=mode), 16)
        assert out.shape == (16, 16, 3) and abs(int(out.mean()) - 77) <= 1
    with pytest.raises(Exception):
        load_image(b"not an image at all", 16)


def test_jpeg_draft_matches_full_decode():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((64, 64, 1))).astype(np.uint8)  # 768 x 1024
    data = _encoded(smooth, "JPEG")
    fast = load_image(data, 64, draft=True).astype(float)
    full = load_image(data, 64, draft=False).astype(float)
    assert np.abs(fast - full).mean() < 3.0  # DCT-scaled decoding is a faithful reduction
