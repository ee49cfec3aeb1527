"""wids (webdataset's indexed dataset) against vermeer's streaming tar reader: throughput and
resume cost, on local shards written by ``vermeer data synth``.

wids is not a vermeer dependency: it ships in ``webdataset<1`` (0.2.x), not in 1.x, which
vermeer uses. To run this, make the ``wids`` package importable beside vermeer's webdataset
1.x, e.g. ``pip download 'webdataset<1' --no-deps -d /tmp/w && unzip /tmp/w/*.whl 'wids/*' -d
/tmp/wids_pkg`` and ``PYTHONPATH=benchmarks:/tmp/wids_pkg python benchmarks/wids_vs_reader.py``.

Rows (best of ``REPEAT`` runs; OS page cache warm for both):

* ``prepare``: what must happen before the first sample. wids needs every shard's sample count
  up front (a full scan of every tar, or an index written beforehand); the reader needs a
  directory listing.
* ``raw-seq``: samples/s reading the bytes of every sample (no decoding), in file order.
* ``raw-chunked``: the same in a shuffled order: wids in ``ChunkedSampler`` order (random
  access inside 1000-sample chunks), the reader through the ``webdataset`` dataset's own shuffle
  (4 shards interleaved, 1000-sample block shuffle) minus decoding (``decode=False``).
* ``decoded``: images/s at 64 px, decoded by the same :func:`load_image`.
* ``resume``: seconds from nothing (new objects) to the first sample at a position in the middle
  of a chunk (worst case for the reader, which re-reads the emitted part of the chunk).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from vermeer_plugins.shards import iter_shard, load_image, resolve_shards
from vermeer_plugins.synthetic_shards import synth_shards
from vermeer_plugins.webdataset import WebDatasetConfig, _Plan, _Stream

SHARDS, PER_SHARD, SOURCE, RES, CHUNK = 16, 250, 96, 64, 1000
REPEAT = int(os.environ.get("REPEAT", "3"))


def best(fn, repeat: int = REPEAT) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    try:
        import wids
    except ImportError:
        sys.exit("wids is not importable: see this file's docstring")
    root = Path(tempfile.mkdtemp(prefix="wids-bench-"))
    urls = synth_shards(str(root), SHARDS * PER_SHARD, SOURCE, shard_size=PER_SHARD, image_format="jpg")
    n = SHARDS * PER_SHARD
    size = sum(os.path.getsize(u) for u in urls)
    rows: list[dict] = []

    def row(name: str, reader: float, wids_: float, unit: str) -> None:
        rows.append({"row": name, "reader": round(reader, 4), "wids": round(wids_, 4), "unit": unit})

    # prepare: the reader lists shards; wids needs nsamples per shard (a scan of each tar)
    t_reader = best(lambda: resolve_shards(str(root)))
    desc: list[dict] = []

    def count() -> None:
        desc.clear()
        for u in urls:
            desc.append({"url": u, "nsamples": sum(1 for _ in iter_shard(u, read_data=False))})

    t_wids = best(count)
    row("prepare", t_reader, t_wids, "s")

    def wids_ds():
        # localname: read the shards where they are (wids would copy each into its cache dir);
        # wids prints a line per dataset it builds
        with contextlib.redirect_stderr(io.StringIO()):
            return wids.ShardListDataset(desc, localname=lambda u: u, transformations=[], lru_size=SHARDS)

    members = {"jpg": 1 << 26, "txt": 1 << 16}

    def reader_seq() -> None:
        for u in urls:
            for s in iter_shard(u, members=members):
                assert s.files["jpg"]

    def wids_seq() -> None:
        ds = wids_ds()
        for i in range(n):
            assert ds[i][".jpg"].read()
        ds.close()

    row("raw-seq", n / best(reader_seq), n / best(wids_seq), "samples/s")

    cfg = WebDatasetConfig(urls=str(root), workers=0, shuffle_buffer=CHUNK, interleave=4)
    plan = _Plan(cfg, resolve_shards(str(root)), resolution=RES, batch_size=1, rank=0, world_size=1, seed=0)

    def reader_chunked() -> None:
        items = _Stream(plan, 0, plan.fresh()).items()
        for _ in range(n):
            next(items)

    def wids_chunked() -> None:
        ds = wids_ds()
        for i in wids.ChunkedSampler(ds, chunksize=CHUNK, seed=0, shufflefirst=True):
            assert ds[i][".jpg"].read()
        ds.close()

    row("raw-chunked", n / best(reader_chunked), n / best(wids_chunked), "samples/s")

    m = n // 4  # decoding dominates: a quarter of the data is enough

    def reader_decoded() -> None:
        items = _Stream(plan, 0, plan.fresh()).items()
        for _ in range(m):
            load_image(next(items)[2], RES)

    def wids_decoded() -> None:
        ds = wids_ds()
        for k, i in enumerate(wids.ChunkedSampler(ds, chunksize=CHUNK, seed=0, shufflefirst=True)):
            if k == m:
                break
            load_image(ds[i][".jpg"].read(), RES)
        ds.close()

    row("decoded", m / best(reader_decoded), m / best(wids_decoded), "images/s")

    # resume in the middle of the third chunk: position 2 * CHUNK + CHUNK // 2
    k = 2 * CHUNK + CHUNK // 2
    st = _Stream(plan, 0, plan.fresh())
    items = st.items()
    for _ in range(k):
        next(items)
    saved = json.loads(json.dumps(st.state()))

    def reader_resume() -> None:
        next(_Stream(plan, 0, saved).items())

    def wids_resume() -> None:
        ds = wids_ds()
        order = list(wids.ChunkedSampler(ds, chunksize=CHUNK, seed=0, shufflefirst=True))
        assert ds[order[k]][".jpg"].read()
        ds.close()

    row("resume", best(reader_resume), best(wids_resume), "s")
    print(json.dumps({"shards": SHARDS, "samples": n, "bytes": size, "source_px": SOURCE, "res": RES,
                      "chunk": CHUNK, "repeat": REPEAT}))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
