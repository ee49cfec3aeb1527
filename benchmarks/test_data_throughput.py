"""Data loading throughput: decode + resize + centre-crop of webdataset JPEG shards at 256² and 1024².

Shards are written in the benchmark's setup by :func:`vermeer_plugins.synthetic_shards.synth_shards`: the
synthetic scenes as JPEG (quality 95) at a source size larger than the target, as photos are
(512 px for the 256 target, so JPEG draft decoding can halve the work; 1280 px for 1024, where
it cannot). Per image, side by side (one group per resolution):

* ``pil-decode`` (baseline): full JPEG decode only, no resize: the floor for any loader.
* ``load_image``: what the ``webdataset`` dataset does per image (draft decode, one antialiased
  bicubic resize of the centred square).
* ``load_image-nodraft``: the same with full-size decoding (``jpeg_draft: false``).
* ``synthetic-render``: rendering the same scene at the target size (the ``synthetic`` dataset).

and end to end, through the dataset (tar reading, shuffling, decoding, collation into float
batches): ``stream-w0`` in-process and ``stream-w2`` with two DataLoader workers. Prints one
JSON line per row; speed is reported, never asserted. ``pytest benchmarks/test_data_throughput.py
-q -s`` takes well under two minutes on a 2-core machine.
"""

from __future__ import annotations

import io
import itertools
import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchlib import compare
from vermeer_plugins.shards import iter_shard, load_image, resolve_shards
from vermeer_plugins.synthetic_shards import synth_shards
from vermeer_plugins import synthetic
from vermeer_plugins.webdataset import WebDatasetConfig, build_webdataset

# target resolution -> (source side, images, batch size)
CASES = {256: (512, 96, 16), 1024: (1280, 24, 4)}


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("throughput")
    out = {}
    for res, (source, n, _) in CASES.items():
        out[res] = root / str(res)
        synth_shards(str(out[res]), n, source, shard_size=n // 4, image_format="jpg")
    return out


def _stream_rate(urls: list[str], res: int, batch: int, n: int, workers: int) -> float:
    """Images per second through the dataset, after the first batch (worker start-up) is out."""
    cfg = WebDatasetConfig(urls=urls, workers=workers, shuffle_buffer=n // 2)
    it = iter(build_webdataset(cfg, resolution=res, batch_size=batch, rank=0, world_size=1, seed=0))
    next(it)
    steps = max(2, (2 * n) // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t0)


@pytest.mark.parametrize("res", list(CASES))
def test_decode_resize_throughput(res: int, shard_dirs: dict[int, Path], bench) -> None:
    source, n, batch = CASES[res]
    urls = resolve_shards(str(shard_dirs[res]))
    images = [s.files["jpg"] for u in urls for s in iter_shard(u)]
    assert len(images) == n
    scenes = [synthetic.scene(0, i) for i in range(n)]

    def cycling(fn):
        items = itertools.cycle(range(n))
        return lambda: fn(next(items))

    def decode_only(i: int) -> None:
        with Image.open(io.BytesIO(images[i])) as im:
            im.load()

    fns = {
        "pil-decode": cycling(decode_only),
        "load_image": cycling(lambda i: load_image(images[i], res)),
        "load_image-nodraft": cycling(lambda i: load_image(images[i], res, draft=False)),
        "synthetic-render": cycling(lambda i: synthetic.render(scenes[i], res)),
    }
    timings, errors = compare(fns, torch.device("cpu"), warmup=1, repeats=3, min_block_ms=100.0)
    assert not errors, errors
    group = f"data/decode+resize {source}->{res}"
    rows = []
    for name, t in timings.items():
        rows.append({"group": group, "name": name, "ms": t.median_ms, "images_per_s": 1e3 / t.median_ms,
                     "baseline": name == "pil-decode"})
    for workers in (0, 2):
        rate = _stream_rate(urls, res, batch, n, workers)
        rows.append({"group": group, "name": f"stream-w{workers}", "ms": 1e3 / rate, "images_per_s": rate,
                     "baseline": False, "note": f"end to end, batch {batch}"})
    base = timings["pil-decode"].median_ms
    for row in rows:
        row["vs_decode_only"] = row["ms"] / base
        bench.record(row["group"], row["name"], ms=row["ms"], baseline=row["baseline"],
                     images_per_s=row["images_per_s"], note=row.get("note"))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
