"""dataset ``webdataset``: decoding, rank/worker splits, exact resume, corrupt data, errors.

Shards are real tars written by ``vermeer data synth`` (8 shards x 6 samples at 24 px)."""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from webdataset import TarWriter

from vermeer_core import data_cli
from vermeer_core.errors import DataError
from vermeer_core.interfaces import DataStream
from vermeer_core.plugins import get_plugins
from vermeer_plugins import synthetic
from vermeer_plugins.shards import ShardError, iter_shard, resolve_shards
from vermeer_plugins.webdataset import REASONS, WebDatasetConfig, WebDatasetStream, build_webdataset

N_SHARDS, PER_SHARD, RES, SEED = 8, 6, 24, 3
N = N_SHARDS * PER_SHARD


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wds") / "shards"
    parser = argparse.ArgumentParser()
    data_cli.register(parser.add_subparsers(), get_plugins().manager)
    args = parser.parse_args(["data", "synth", "--out", str(out), "--n", str(N), "--resolution", str(RES),
                              "--shard-size", str(PER_SHARD), "--seed", str(SEED)])
    assert args.func(args) == 0
    return out


@pytest.fixture(scope="module")
def pattern(shard_dir) -> str:
    return str(shard_dir) + "/shard-{000000..000007}.tar"


@pytest.fixture(scope="module")
def reference() -> list[tuple[str, bytes]]:
    """(caption, 24 px uint8 pixels) of every sample: what decoding at 24 px must give."""
    out = []
    for i in range(N):
        s = synthetic.scene(SEED, i)
        pixels = np.clip(np.rint((synthetic.render(s, RES).transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        out.append((synthetic.caption(s), pixels.tobytes()))
    return out


def stream(urls: str | list[str], *, res: int = RES, batch: int = 4, rank: int = 0, world: int = 1, seed: int = 0,
           **cfg) -> WebDatasetStream:
    cfg.setdefault("workers", 0)
    return build_webdataset(WebDatasetConfig(urls=urls, **cfg), resolution=res, batch_size=batch, rank=rank,
                            world_size=world, seed=seed)


def take(ds: WebDatasetStream, n: int) -> list[tuple[torch.Tensor, list[str]]]:
    it = iter(ds)
    return [(b.images, b.captions) for b in (next(it) for _ in range(n))]


def identities(batches) -> list[tuple[str, bytes]]:
    """(caption, uint8 pixels) per sample: identifies a sample at the native resolution."""
    out = []
    for images, captions in batches:
        pixels = ((images + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        out += [(c, p.numpy().tobytes()) for c, p in zip(captions, pixels)]
    return out


def write_shard(path: Path, samples: list[dict[str, bytes | str]]) -> str:
    with TarWriter(str(path), encoder=False, mtime=0.0) as w:
        for s in samples:
            w.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in s.items()})
    return str(path)


# --- decoding ----------------------------------------------------------------------------------
def test_one_epoch_decodes_every_sample_exactly(pattern, reference):
    ds = stream(pattern)
    assert isinstance(ds, DataStream)
    batches = take(ds, N // 4)
    for images, captions in batches:
        assert images.shape == (4, 3, RES, RES) and images.dtype == torch.float32 and len(captions) == 4
        assert images.min() >= -1.0 and images.max() <= 1.0
    assert Counter(identities(batches)) == Counter(reference)  # every sample once, pixels exact
    assert ds.stats()["epoch"] == 1 and ds.stats()["samples_read"] == N and ds.stats()["corrupt"] == 0


@pytest.mark.parametrize("res", [12, 40])
def test_resized_to_the_stage_resolution(pattern, res):
    """Down- and upscaled images match the scene rendered at that resolution, caption included."""
    scenes = [synthetic.scene(SEED, i) for i in range(N)]
    ref = torch.stack([torch.from_numpy(synthetic.render(s, res)) for s in scenes])
    batches = take(stream(pattern, res=res), 12)
    images = torch.cat([b[0] for b in batches])
    captions = [c for b in batches for c in b[1]]
    assert images.shape == (N, 3, res, res)
    dist = (images[:, None] - ref[None]).abs().mean(dim=(2, 3, 4))  # (got, reference)
    best = dist.argmin(1)
    assert sorted(best.tolist()) == list(range(N))
    assert [synthetic.caption(scenes[j]) for j in best.tolist()] == captions
    assert dist.min(1).values.max() < 0.06  # edges differ a little: resampled vs analytically rendered


# --- splitting ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("world", "workers"), [(2, 0), (2, 2), (1, 2)])
def test_ranks_and_workers_cover_an_epoch_without_duplicates(pattern, reference, world, workers):
    per_rank = N // world // 4  # batches of 4 in one epoch of one rank
    seen = []
    for rank in range(world):
        seen += identities(take(stream(pattern, rank=rank, world=world, workers=workers, shuffle_buffer=5), per_rank))
    assert Counter(seen) == Counter(reference)


def test_epochs_reshuffle(pattern):
    batches = take(stream(pattern), 24)
    first, second = identities(batches[:12]), identities(batches[12:])
    assert Counter(first) == Counter(second) and first != second


def test_memory_urls_with_workers(pattern, reference):
    fs = fsspec.filesystem("memory")
    root = "/wds-test-shards"
    for url in resolve_shards(pattern):
        fs.pipe(f"{root}/{Path(url).name}", Path(url).read_bytes())
    try:
        ds = stream(f"memory://{root}/shard-{{000000..000007}}.tar", workers=2)
        assert Counter(identities(take(ds, N // 4))) == Counter(reference)
    finally:
        fs.rm(root, recursive=True)


def test_too_few_shards_for_the_streams(pattern, shard_dir):
    two = [str(shard_dir / "shard-000000.tar"), str(shard_dir / "shard-000001.tar")]
    with pytest.raises(DataError, match="2 shards cannot feed 2 ranks x 2 workers.*resample"):
        stream(two, world=2, workers=2)
    assert len(take(stream(two, world=2, rank=1, workers=2, resample=True), 5)) == 5


# --- resume ------------------------------------------------------------------------------------
@pytest.mark.parametrize("resample", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_exactly_the_uninterrupted_batches(pattern, workers, resample):
    """Stop after k batches, resume from a JSON round trip of state_dict(): the batches that
    follow are exactly those of an uninterrupted stream (shuffle chunks, shard interleaving,
    worker round-robin and epoch ends included). Resumes twice in a row."""
    cfg = dict(workers=workers, resample=resample, shuffle_buffer=5, interleave=2, batch=3)
    total = 40  # 120 samples: 2.5 epochs
    ref = take(stream(pattern, **cfg), total)
    for cuts in ([7], [1, 16], [21, 33]):
        got, state = [], None
        for a, b in zip([0, *cuts], [*cuts, total]):
            ds = stream(pattern, **cfg)
            if state is not None:
                ds.load_state_dict(json.loads(json.dumps(state)))
            got += take(ds, b - a)
            state = ds.state_dict()
        for (gi, gc), (ri, rc) in zip(got, ref, strict=True):
            assert gc == rc
            assert torch.equal(gi, ri)


def test_position_carries_across_resolution_and_batch_size(pattern):
    """E.g. from one growth stage to the next: the sample sequence continues where it stopped."""
    ref = [c for _, cs in take(stream(pattern, res=16, batch=2, shuffle_buffer=5), 30) for c in cs]
    first = stream(pattern, res=24, batch=3, shuffle_buffer=5)
    head = [c for _, cs in take(first, 7) for c in cs]
    second = stream(pattern, res=16, batch=2, shuffle_buffer=5)
    second.load_state_dict(first.state_dict())
    tail = take(second, 9)
    assert tail[0][0].shape == (2, 3, 16, 16)
    assert head + [c for _, cs in tail for c in cs] == ref[:39]


def test_changed_world_size_starts_the_next_epoch(pattern, caplog):
    two = stream(pattern, world=2, rank=0)
    take(two, 3)  # half of rank 0's epoch 0
    one = stream(pattern)
    with caplog.at_level(logging.WARNING):
        one.load_state_dict(json.loads(json.dumps(two.state_dict())))
    assert "starting epoch 1" in caplog.text and "rank 0 of 2" in caplog.text
    assert one.stats()["epoch"] == 1
    uninterrupted = take(stream(pattern), 12 + 4)[12:]  # what follows one whole epoch
    for (gi, gc), (ri, rc) in zip(take(one, 4), uninterrupted, strict=True):
        assert gc == rc and torch.equal(gi, ri)


def test_state_of_another_dataset_is_rejected(pattern):
    with pytest.raises(DataError, match="unrecognised data position"):
        stream(pattern).load_state_dict({"next_index": 5})


# --- corrupt data ------------------------------------------------------------------------------
@pytest.fixture
def damaged(shard_dir, tmp_path) -> dict[str, str]:
    """Four shards of 6: one good, one with a garbage image, one with a sample missing its
    caption, one truncated in its middle."""
    samples = [s for url in resolve_shards(str(shard_dir))[:4] for s in iter_shard(url)]
    rows = [{"__key__": s.key, "png": s.files["png"], "txt": s.files["txt"]} for s in samples]
    rows[8]["png"] = b"\x89PNG garbage, not an image"
    del rows[13]["txt"]
    shards = {name: write_shard(tmp_path / f"{name}.tar", rows[6 * i: 6 * i + 6])
              for i, name in enumerate(["good", "bad_image", "no_caption", "truncated"])}
    data = Path(shards["truncated"]).read_bytes()
    Path(shards["truncated"]).write_bytes(data[: len(data) // 2])
    return shards


def test_corrupt_samples_are_skipped_counted_and_logged(damaged, caplog):
    readable = []
    with pytest.raises(ShardError):  # after the complete samples
        for s in iter_shard(damaged["truncated"]):
            readable.append(s.files["txt"].decode())
    assert 0 < len(readable) < 6
    # Read in order (no shuffling), damaged shards first, so every problem is met before the
    # last usable sample is handed out.
    order = ["truncated", "no_caption", "bad_image", "good"]
    ds = stream([damaged[k] for k in order], batch=1, shard_shuffle=False, shuffle_buffer=1, interleave=1)
    expected = readable + [s.files["txt"].decode() for k in order[1:] for s in iter_shard(damaged[k])
                           if "txt" in s.files and not s.files["png"].startswith(b"\x89PNG garbage")]
    assert len(expected) == len(readable) + 16
    with caplog.at_level(logging.WARNING, logger="vermeer_plugins.webdataset"):
        got = [c for _, (c,) in take(ds, len(expected))]
    assert got == expected
    stats = ds.stats()
    assert {k: stats[k] for k in REASONS} == {**dict.fromkeys(REASONS, 0), "truncated_tar": 1,
                                              "undecodable_image": 1, "missing_caption": 1}
    assert stats["corrupt"] == 3 and stats["samples_read"] == len(readable) + 18
    for reason, shard in [("truncated_tar", "truncated"), ("undecodable_image", "bad_image"),
                          ("missing_caption", "no_caption")]:
        assert any(reason in r.getMessage() and damaged[shard] in r.getMessage() for r in caplog.records)


def test_resume_with_corrupt_data_neither_repeats_nor_recounts(damaged):
    """Re-reading a partly emitted chunk after resuming counts none of its problems twice."""
    cfg = dict(batch=2, shuffle_buffer=7, interleave=2)
    urls = list(damaged.values())
    full = stream(urls, **cfg)
    ref = take(full, 25)
    for cut in (3, 8, 11):
        first = stream(urls, **cfg)
        head = take(first, cut)
        resumed = stream(urls, **cfg)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert resumed.stats() == first.stats()
        tail = take(resumed, 25 - cut)
        assert [c for _, c in head + tail] == [c for _, c in ref]
        assert resumed.stats() == full.stats()


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_budget_raises_naming_the_shards(damaged, workers):
    ds = stream(list(damaged.values()), workers=workers, batch=1, max_corrupt=2, max_corrupt_fraction=0.0)
    with pytest.raises(DataError, match="too much corrupt data on rank 0: 3 problems") as info:
        take(ds, 100)
    msg = str(info.value)
    assert all(damaged[k] in msg for k in ("truncated", "bad_image", "no_caption"))
    assert "data.max_corrupt" in msg and "Traceback" not in msg


@pytest.mark.parametrize("workers", [0, 2])
def test_all_unusable_fails_instead_of_hanging(tmp_path, workers):
    bad = [write_shard(tmp_path / f"s{i}.tar", [{"__key__": f"{i}{j}", "png": b"junk", "txt": "a cat"}
                                                for j in range(3)]) for i in range(2)]
    with pytest.raises(DataError, match="too much corrupt data"):
        take(stream(bad, workers=workers, max_corrupt=20, max_corrupt_fraction=0.5), 1)
    nocap = [write_shard(tmp_path / f"n{i}.tar", [{"__key__": f"{i}{j}", "png": b"junk"} for j in range(3)])
             for i in range(2)]
    with pytest.raises(DataError, match="no usable sample.*caption_key"):
        take(stream(nocap, workers=workers), 1)


def test_missing_shards_name_the_pattern(shard_dir):
    pat = str(shard_dir) + "/shard-{000000..000011}.tar"
    with pytest.raises(DataError, match=r"4 of 12 shards of .*shard-\{000000\.\.000011\}\.tar"):
        stream(pat)
    with pytest.raises(DataError, match="no shards matched"):
        stream(str(shard_dir) + "/other-*.tar")


# --- resample mode and registration ------------------------------------------------------------
def test_resample_draws_shards_uniformly_with_replacement(pattern):
    plan = stream(pattern, resample=True, world=2, workers=2)._plan
    rounds = [plan.share(e, s) for e in range(500) for s in range(2)]
    assert {len(r) for r in rounds} == {2}  # ceil(8 shards / 4 streams) per round
    counts = Counter(u for r in rounds for u in r)
    assert len(counts) == N_SHARDS
    expected = 2000 / N_SHARDS
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001
    assert any(r[0] == r[1] for r in rounds)  # with replacement


def test_registered_in_the_registry(pattern):
    from vermeer_core.plugins import get_registry, load
    from vermeer_plugins import webdataset

    registry = get_registry()
    if "webdataset" not in registry.names("dataset"):  # before pyproject lists the entry point
        registry = load(extra=[webdataset], autoload=False).registry
    ref = registry.parse("dataset", {"type": "webdataset", "urls": pattern, "workers": 0})
    ds = registry.build(ref, "dataset", resolution=16, batch_size=2, rank=0, world_size=1, seed=0)
    assert next(iter(ds)).images.shape == (2, 3, 16, 16)
    with pytest.raises(Exception, match="max_corrupt_fraction"):
        registry.parse("dataset", {"type": "webdataset", "urls": pattern, "max_corrupt_fraction": 1.0})


def test_shard_that_disappears_is_counted_unreadable(shard_dir, tmp_path, caplog):
    urls = []
    for url in resolve_shards(str(shard_dir))[:4]:
        urls.append(str(tmp_path / Path(url).name))
        Path(urls[-1]).write_bytes(Path(url).read_bytes())
    ds = stream(urls, batch=2, shard_shuffle=False, shuffle_buffer=1, interleave=1)
    Path(urls[0]).unlink()  # after the listing: e.g. deleted from the bucket mid-run
    with caplog.at_level(logging.WARNING, logger="vermeer_plugins.webdataset"):
        take(ds, 9)  # the 18 samples of the three other shards
    assert ds.stats()["unreadable_shard"] == 1 and ds.stats()["corrupt"] == 1
    assert urls[0] in caplog.text
