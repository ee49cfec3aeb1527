"""Real collections in: ``vermeer data from-folder`` (a real process, real files) and the
``webdataset`` dataset on shards laid out exactly as img2dataset writes them."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset import TarWriter

from vermeer_core.cli import main
from vermeer_plugins.folder import folder_shards
from vermeer_plugins.shards import iter_shard, load_image, resolve_shards
from vermeer_plugins.webdataset import WebDatasetConfig, build_webdataset


def picture(w: int, h: int, seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def vermeer(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vermeer_core", *argv], capture_output=True, text=True, timeout=180)


def every_sample(url: str, res: int = 16) -> list[tuple[str, bytes]]:
    """(caption, pixels) of one epoch, in order (one worker, no shuffle)."""
    cfg = WebDatasetConfig(urls=url, workers=0, shuffle_buffer=1, shard_shuffle=False, interleave=1)
    ds = build_webdataset(cfg, resolution=res, batch_size=1, rank=0, world_size=1, seed=0)
    out = []
    for batch in ds:
        if ds.stats()["epoch"] > 0:
            break
        out.append((batch.captions[0], batch.images.numpy().tobytes()))
    return out


# --- from-folder -------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(picture(40, 30, 1, "JPEG"))
    (root / "a.txt").write_text("a red kite")
    (root / "sub" / "b.png").write_bytes(picture(20, 20, 2, "PNG"))
    (root / "sub" / "b.txt").write_text("  two boats\n")
    (root / "c.webp").write_bytes(picture(24, 24, 3, "WEBP"))
    (root / "c.txt").write_text("caf\u00e9 at night", encoding="utf-8")
    (root / "d.JPEG").write_bytes(picture(16, 16, 4, "PNG"))  # a PNG named .JPEG: stored as .png
    (root / "d.txt").write_text("misnamed")
    (root / "nocap.png").write_bytes(picture(8, 8, 5, "PNG"))
    (root / "latin1.png").write_bytes(picture(8, 8, 6, "PNG"))
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "broken.jpg").write_bytes(b"not an image at all")
    (root / "broken.txt").write_text("broken")
    (root / "notes.md").write_text("ignored")
    return root


def test_from_folder_cli_writes_readable_shards(folder, tmp_path):
    out = tmp_path / "shards"
    old = os.umask(0o022)
    try:
        r = vermeer("data", "from-folder", str(folder), "--out", str(out), "--shard-size", "3")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert "2 shards, 4 samples" in r.stdout
    assert "skipped 1 (missing_caption): nocap.png" in r.stdout
    assert "skipped 1 (undecodable_caption): latin1.png" in r.stdout
    assert "skipped 1 (undecodable_image): broken.jpg" in r.stdout
    shards = sorted(out.iterdir())
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in shards)
    samples = [s for p in shards for s in iter_shard(str(p))]
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002", "000000003"]
    # sorted source paths: a.jpg, c.webp, d.JPEG (really a PNG), sub/b.png
    assert [sorted(s.files) for s in samples] == [["jpg", "json", "txt"], ["json", "txt", "webp"],
                                                   ["json", "png", "txt"], ["json", "png", "txt"]]
    assert samples[0].files["jpg"] == (folder / "a.jpg").read_bytes()  # stored as is
    assert json.loads(samples[2].files["json"]) == {"key": "000000002", "path": "d.JPEG", "width": 16, "height": 16}
    got = every_sample(str(out))
    assert [c for c, _ in got] == ["a red kite", "caf\u00e9 at night", "misnamed", "two boats"]


def test_from_folder_with_csv_and_jsonl_captions(folder, tmp_path):
    csv = tmp_path / "caps.csv"
    csv.write_text('path,caption\nsub/b.png,"boats, two"\nnocap.png,now captioned\nmissing.png,gone\n')
    report = folder_shards(folder, str(tmp_path / "o1"), captions=csv)
    assert report.written == 2 and report.skipped["missing_image"] == ["missing.png"]
    assert sorted(c for c, _ in every_sample(str(tmp_path / "o1"))) == ["boats, two", "now captioned"]
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text(json.dumps({"path": "a.jpg", "caption": "kite"}) + "\n\n")
    assert folder_shards(folder, str(tmp_path / "o2"), captions=jsonl).written == 1


@pytest.mark.parametrize("name, content, message", [
    ("bad.csv", "file,text\na.jpg,x\n", "header naming the columns path,caption"),
    ("bad.jsonl", '{"path": "a.jpg", "caption": "x"}\n{oops\n', "line 2: not JSON"),
    ("bad.jsonl", '{"path": "a.jpg"}\n', "line 1: expected a path and a caption"),
    ("bad.txt", "a.jpg,x\n", "expected a .csv or .jsonl"),
])
def test_from_folder_bad_caption_files_are_messages(folder, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    code = main(["data", "from-folder", str(folder), "--out", str(tmp_path / "o"), "--captions", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_from_folder_without_usable_images_is_a_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "from-folder", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert "no usable captioned image" in capsys.readouterr().err
    assert main(["data", "from-folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert "is not a directory" in capsys.readouterr().err


# --- img2dataset's layout ----------------------------------------------------------------------
def write_img2dataset(out: Path, shards: int, per_shard: int, fmt: str = "jpg") -> list[dict]:
    """Shards as img2dataset's webdataset writer lays them out: ``{shard:05d}.tar`` written by
    webdataset's TarWriter with its defaults (str captions encoded by the writer, float mtime:
    pax headers), keys ``{shard:05d}{index:04d}``, members ``.jpg``, ``.txt`` and an indented
    ``.json`` of the sample's metadata; ``{shard:05d}.parquet`` (the same metadata; a placeholder
    here, pyarrow is not a dependency) and ``{shard:05d}_stats.json`` beside. A failed download
    is in the parquet but not in the tar, as img2dataset does."""
    out.mkdir(parents=True)
    metas = []
    for s in range(shards):
        name = f"{s:05d}"
        with open(out / f"{name}.tar", "wb") as f:
            writer = TarWriter(f)
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                w, h = (64 + 8 * i, 48) if i % 3 else (20, 30)  # every third is small (min side 20)
                meta = {"url": f"https://example.invalid/{key}.jpg", "caption": f"photo {key}", "key": key,
                        "status": "success", "error_message": None, "width": w, "height": h,
                        "original_width": w * 4, "original_height": h * 4, "exif": "{}", "sha256": "0" * 64}
                img = picture(w, h, s * 100 + i, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
                writer.write({"__key__": key, fmt: img, "txt": meta["caption"], "json": json.dumps(meta, indent=4)})
                metas.append(meta)
            writer.close()
        (out / f"{name}.parquet").write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
        (out / f"{name}_stats.json").write_text(json.dumps({"count": per_shard + 1, "successes": per_shard,
                                                            "failed_to_download": 1}, indent=4))
    return metas


def test_img2dataset_shards_are_read(tmp_path):
    root = tmp_path / "laion"
    metas = write_img2dataset(root, shards=2, per_shard=6)
    assert resolve_shards(str(root)) == [str(root / "00000.tar"), str(root / "00001.tar")]  # not parquet/stats
    first = next(iter_shard(str(root / "00000.tar")))
    assert first.key == "000000000" and set(first.files) == {"jpg", "txt", "json"}
    got = every_sample(str(root))
    assert [c for c, _ in got] == [m["caption"] for m in metas]
    expect = load_image(picture(72, 48, 1, "JPEG"), 16)  # sample 000000001, decoded the dataset's way
    np.testing.assert_allclose(np.frombuffer(got[1][1], np.float32).reshape(3, 16, 16),
                               expect.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)


def test_img2dataset_min_size_filter(tmp_path):
    root = tmp_path / "laion"
    write_img2dataset(root, shards=2, per_shard=6, fmt="webp")
    cfg = WebDatasetConfig(urls=str(root), workers=0, shuffle_buffer=4, min_image_size=32)
    ds = build_webdataset(cfg, resolution=16, batch_size=2, rank=0, world_size=1, seed=0)
    it = iter(ds)
    captions = [c for _ in range(4) for c in next(it).captions]
    assert len(set(captions)) == 8 and all(int(c[-1]) % 3 for c in captions)  # the 4 small ones are filtered
    st = ds.stats()
    assert st["filtered_small"] == 4 and st["corrupt"] == 0
