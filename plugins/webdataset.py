"""dataset ``webdataset``: captioned images in webdataset tar shards on any fsspec filesystem.

**Streams.** A rank reads through ``S = max(1, workers)`` *streams*, one per DataLoader worker.
Epoch ``e`` permutes the shard list with ``(seed, e)`` (the same permutation on every rank);
rank ``r`` of ``w`` takes ``perm[r::w]`` (webdataset's ``split_by_node``) and its stream ``s``
takes every S-th of those (``split_by_worker``), so no shard is read twice in an epoch and the
ranks of any world size together read every shard once per epoch. With ``resample: true``
each stream instead draws its shards of round ``e`` uniformly *with replacement* from all
shards (seeded by ``(seed, e, stream)``): samples are i.i.d. draws, and any shard count works.

**Shuffling.** A stream keeps ``interleave`` shards open and reads the next sample from one of
them picked at random; ``shuffle_buffer`` samples read this way form a chunk, which is emitted
in a random permutation (a block shuffle; a chunk never spans two epochs, so an epoch is
exactly its shards' samples). All randomness is seeded by ``(seed, stream, epoch, chunk)``.

**Position, exact.** A stream's position is the start of its current chunk (epoch, chunk,
next shard, and for each open shard the byte offset of its next sample) plus how many of the
chunk's samples were emitted. A worker sends its position with every batch; the rank's
:meth:`state_dict` holds the position of each stream after its last *consumed* batch and the
number of batches consumed (the DataLoader takes batches from workers round-robin, so that
count says which stream serves next). Resuming reopens each stream's shards at their offsets,
re-reads the one partly emitted chunk (at most ``shuffle_buffer`` samples, undecoded) and skips
what was emitted: the batches after resuming are exactly the batches of an uninterrupted run,
in both modes. Positions count samples, not pixels or batches: a state also resumes a stream
built for another resolution or batch size (e.g. the next growth stage), each stream at its
next sample (with several workers the batches are then interleaved differently).

**Changed world size / workers / shards.** Streams then differ, so no exact mapping exists.
The rank gets rank 0's state (see :meth:`WebDatasetStream.load_state_dict`) and every stream
starts the epoch after the most advanced one recorded there: nothing is repeated within an
epoch; the unread rest of the interrupted epoch is skipped (in ``resample`` mode rounds are
i.i.d., so the statistics are unchanged). A warning says so.

**Corrupt data** (a truncated or damaged tar, an image that does not decode, a sample without
image or caption, a shard that cannot be opened, an image member over ``max_image_bytes`` or a
caption over ``max_caption_bytes`` (never read: the tar header gives the size), an image whose
header declares more than ``max_pixels`` pixels (refused before decoding: decompression bombs))
is skipped, logged with the shard URL and
counted by reason (:meth:`WebDatasetStream.stats`, logged by the engine as ``data_<reason>``).
More than ``max_corrupt + max_corrupt_fraction * samples_read`` problems on a rank raise
:class:`~vermeer_core.errors.DataError` naming the worst shards. Images whose shorter side is
below ``min_image_size`` are a filter, not damage: counted as ``filtered_small``, outside the
budget (img2dataset's ``.json`` and other members are not read at all).

**Layouts.** Any webdataset tar shards: ``vermeer data synth`` / ``from-folder`` output, and
img2dataset's (``00000.tar`` with ``000000000.jpg/.txt/.json``; the ``.parquet`` and
``_stats.json`` files beside the tars are not shards and are ignored when ``urls`` is a
directory). Image modes are converted by :func:`vermeer_plugins.shards.to_rgb` (16-bit scaled,
transparency over white).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vermeer_core.api import Batch, ComponentConfig, DataError, hookimpl
from vermeer_plugins.shards import (
    DEFAULT_MAX_PIXELS,
    ImageTooLarge,
    ImageTooSmall,
    RawSample,
    ShardError,
    iter_shard,
    load_image,
    register_fsspec_openers,
    resolve_shards,
)

__all__ = ["REASONS", "WebDatasetConfig", "WebDatasetStream", "build_webdataset", "vermeer_register"]

log = logging.getLogger(__name__)

#: Why a sample or shard was skipped; every one is a key of :meth:`WebDatasetStream.stats`.
REASONS: tuple[str, ...] = (
    "truncated_tar", "unreadable_shard", "missing_image", "missing_caption", "undecodable_caption",
    "undecodable_image", "oversized_image", "oversized_member",
)
_STATE_VERSION = 1
_WORST = 20  # shards named in a state / an error (the ones with the most problems)
_UNIT = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)  # uint8 -> [-1, 1], exact ends


class WebDatasetConfig(ComponentConfig):
    """Where the shards are and how to read them."""

    urls: str | tuple[str, ...] = Field(
        description="shard URL(s): brace patterns ('gs://b/cc12m-{000000..001099}.tar'), globs or a directory; "
        "any fsspec URL (local path, memory://, gs://)",
    )
    caption_key: str = Field("txt", min_length=1, description="tar extension holding the caption (UTF-8)")
    image_keys: tuple[str, ...] = Field(
        ("jpg", "jpeg", "png", "webp"), min_length=1, description="image extensions, first present wins"
    )
    resample: bool = Field(
        False, description="draw shards with replacement (i.i.d. rounds) instead of permuted epochs"
    )
    shard_shuffle: bool = Field(True, description="permute the shards every epoch (False: listed order)")
    shuffle_buffer: int = Field(1000, ge=1, description="samples per shuffled chunk (1 = no sample shuffle)")
    interleave: int = Field(4, ge=1, description="shards each stream reads at once, mixed at random")
    workers: int = Field(2, ge=0, description="DataLoader worker processes per rank (0: read in-process)")
    prefetch: int = Field(2, ge=1, description="batches each worker prepares ahead")
    pin_memory: bool | None = Field(None, description="pinned host memory (None: when CUDA is available)")
    max_corrupt: int = Field(
        100, ge=0, description="problems (skipped samples/shards) a rank tolerates, plus the fraction below"
    )
    max_corrupt_fraction: float = Field(
        0.01, ge=0.0, lt=1.0,
        description="allowed = max_corrupt + this x samples read; more raise a DataError naming the shards",
    )
    jpeg_draft: bool = Field(True, description="decode large JPEGs at a reduced DCT scale (faster, same look)")
    max_pixels: int | None = Field(
        DEFAULT_MAX_PIXELS, ge=1,
        description="refuse images whose header declares more pixels (before decoding; counted oversized_image); "
        "null: no limit",
    )
    max_image_bytes: int = Field(64 << 20, ge=1, description="image members larger than this are skipped unread "
                                 "(counted oversized_member)")
    max_caption_bytes: int = Field(64 << 10, ge=1, description="caption members larger than this are skipped unread "
                                   "(counted oversized_member)")
    min_image_size: int = Field(0, ge=0, description="skip images whose shorter side is smaller (counted "
                                "filtered_small, not corrupt)")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="passed to fsspec for remote URLs (e.g. {token: anon, project: p})"
    )


# --- the plan: what every stream reads, a pure function of config, shards and seed -------------
class _Plan:
    """Immutable, picklable description shared by the rank and its workers."""

    def __init__(
        self, config: WebDatasetConfig, shards: list[str], *, resolution: int, batch_size: int, rank: int,
        world_size: int, seed: int,
    ) -> None:
        self.config = config
        self.shards = shards
        self.resolution = resolution
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.streams = max(1, config.workers)
        self.digest = hashlib.sha256(
            json.dumps([shards, seed, config.resample, config.shard_shuffle, config.interleave, config.shuffle_buffer,
                        config.caption_key, config.image_keys]).encode()
        ).hexdigest()[:16]

    def share(self, epoch: int, stream: int) -> list[str]:
        """The shards ``stream`` of this rank reads in ``epoch``, in order."""
        n = len(self.shards)
        gid = self.rank * self.streams + stream
        if self.config.resample:
            rounds = math.ceil(n / (self.world_size * self.streams))
            draw = np.random.default_rng([self.seed, epoch, gid, 2]).integers(n, size=rounds)
            return [self.shards[i] for i in draw]
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(n) if self.config.shard_shuffle else range(n)
        return [self.shards[i] for i in list(order)[self.rank :: self.world_size][stream :: self.streams]]

    def fresh(self, epoch: int = 0) -> dict[str, Any]:
        """The position of a stream at the start of ``epoch``, with no problems counted."""
        return {"head": {"epoch": epoch, "chunk": 0, "next_shard": 0, "open": []}, "emitted": 0,
                "read": 0, "problems": {}, "shards": {}, "filtered": 0}

    def members(self) -> dict[str, int]:
        """The tar members read (extension -> byte limit): the images and the caption."""
        cfg = self.config
        return {**{k: cfg.max_image_bytes for k in cfg.image_keys}, cfg.caption_key: cfg.max_caption_bytes}


def _over_budget(config: WebDatasetConfig, problems: int, read: int) -> bool:
    return problems > config.max_corrupt + config.max_corrupt_fraction * read


def _budget_message(
    config: WebDatasetConfig, rank: int, problems: Counter[str], read: int, shards: Counter[str]
) -> str:
    worst = ", ".join(f"{u} ({c})" for u, c in shards.most_common(5))
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(problems.items()))
    return (
        f"webdataset: too much corrupt data on rank {rank}: {sum(problems.values())} problems in {read} samples read "
        f"(allowed: {config.max_corrupt} + {config.max_corrupt_fraction:g} x samples read): {kinds}. "
        f"Worst shards: {worst}. Repair or remove these shards, or raise data.max_corrupt / data.max_corrupt_fraction"
    )


# --- one stream: raw samples in shuffled order, then decoded batches ----------------------------
class _Stream:
    """A stream's reader. ``state()`` is its position after the last sample handed out."""

    def __init__(self, plan: _Plan, stream: int, state: dict[str, Any]) -> None:
        self.plan = plan
        self.stream = stream
        self.gid = plan.rank * plan.streams + stream
        self.start = json.loads(json.dumps(state["head"]))  # start of the current chunk
        self.emitted = int(state["emitted"])
        self.read = int(state["read"])
        self.problems: Counter[str] = Counter(state["problems"])
        self.shards: Counter[str] = Counter(state["shards"])
        self.filtered = int(state.get("filtered", 0))

    def state(self) -> dict[str, Any]:
        return {"head": self.start, "emitted": self.emitted, "read": self.read, "problems": dict(self.problems),
                "shards": dict(self.shards.most_common(_WORST)), "filtered": self.filtered}

    def bad(self, reason: str, url: str, detail: str, quiet: bool = False) -> None:
        """Log and count one problem; ``quiet``: re-reading a chunk after resuming, whose
        problems were counted before (logged again, not counted again)."""
        log.warning("webdataset: skipped (%s) in %s: %s%s", reason, url, detail,
                    " (re-read after resuming; counted before)" if quiet else "")
        if quiet:
            return
        self.problems[reason] += 1
        self.shards[url] += 1
        if _over_budget(self.plan.config, sum(self.problems.values()), self.read):
            raise DataError(_budget_message(self.plan.config, self.plan.rank, self.problems, self.read, self.shards))

    def _check(self, raw: RawSample, url: str, quiet: bool) -> tuple[str, bytes, str] | None:
        """(key, image bytes, caption), or None after counting why the sample is unusable."""
        cfg = self.plan.config
        if raw.oversized:
            what = ", ".join(f".{k} of {v} bytes" for k, v in raw.oversized.items())
            self.bad("oversized_member", url, f"sample {raw.key}: {what} (limits: max_image_bytes "
                     f"{cfg.max_image_bytes}, max_caption_bytes {cfg.max_caption_bytes})", quiet)
            return None
        image = next((raw.files[k] for k in cfg.image_keys if k in raw.files), None)
        if image is None:
            self.bad("missing_image", url, f"sample {raw.key} has none of {list(cfg.image_keys)}", quiet)
            return None
        text = raw.files.get(cfg.caption_key)
        if text is None or not text.strip():
            self.bad("missing_caption", url, f"sample {raw.key} has no (or an empty) .{cfg.caption_key}", quiet)
            return None
        try:
            caption = text.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            self.bad("undecodable_caption", url, f"sample {raw.key}: {exc}", quiet)
            return None
        return raw.key, image, caption

    def items(self) -> Iterator[tuple[str, str, bytes, str]]:
        """(url, key, image bytes, caption) forever, resuming at the saved position."""
        head = json.loads(json.dumps(self.start))
        share = self.plan.share(head["epoch"], self.stream)
        members = self.plan.members()
        cursors = [[pos, off, iter_shard(share[pos], offset=off, storage_options=self.plan.config.storage_options,
                                         members=members)]
                   for pos, off in head["open"]]
        skip = self.emitted  # a partly emitted chunk is re-read quietly and its head skipped
        # Usable samples in this epoch, known only when it was read from its start here.
        good: int | None = 0 if head["chunk"] == 0 else None
        while True:
            self.start = {"epoch": head["epoch"], "chunk": head["chunk"], "next_shard": head["next_shard"],
                          "open": [[c[0], c[1]] for c in cursors]}
            chunk = self._fill(head, share, cursors, quiet=skip > 0)
            good = None if good is None else good + len(chunk)
            if head["next_shard"] >= len(share) and not cursors:  # epoch done: the next chunk starts the next
                if good == 0:  # without this, a stream of only unusable samples would never yield
                    raise DataError(
                        f"webdataset: rank {self.plan.rank} stream {self.stream} read no usable sample in epoch "
                        f"{head['epoch']} from {len(share)} shards (e.g. {share[0]}): check the shards' contents "
                        f"and data.image_keys / data.caption_key"
                    )
                head.update(epoch=head["epoch"] + 1, chunk=0, next_shard=0)
                share = self.plan.share(head["epoch"], self.stream)
                good = 0
            else:
                head["chunk"] += 1
            for i in range(skip, len(chunk)):
                self.emitted = i + 1
                if self.emitted == len(chunk):  # normalise: "all emitted" is the next chunk's start
                    self.start = {"epoch": head["epoch"], "chunk": head["chunk"], "next_shard": head["next_shard"],
                                  "open": [[c[0], c[1]] for c in cursors]}
                    self.emitted = 0
                yield chunk[i]
            skip = 0

    def _fill(
        self, head: dict[str, Any], share: list[str], cursors: list[list[Any]], quiet: bool
    ) -> list[tuple[str, str, bytes, str]]:
        """Read the next chunk: up to ``shuffle_buffer`` samples from the open shards (picked
        at random), returned in a random permutation. Advances ``head`` and ``cursors``."""
        cfg = self.plan.config
        rng = np.random.default_rng([self.plan.seed, self.gid, head["epoch"], head["chunk"], 3])
        chunk: list[tuple[str, str, bytes, str]] = []
        while len(chunk) < cfg.shuffle_buffer:
            while len(cursors) < cfg.interleave and head["next_shard"] < len(share):
                pos = head["next_shard"]
                cursors.append([pos, 0, iter_shard(share[pos], storage_options=cfg.storage_options,
                                                   members=self.plan.members())])
                head["next_shard"] += 1
            if not cursors:
                break
            j = int(rng.integers(len(cursors))) if len(cursors) > 1 else 0
            url = share[cursors[j][0]]
            try:
                raw = next(cursors[j][2])
            except StopIteration:
                del cursors[j]
                continue
            except ShardError as exc:
                del cursors[j]
                self.bad(exc.reason, url, f"{exc}; rest of the shard skipped", quiet)
                continue
            cursors[j][1] = raw.next_offset
            if not quiet:
                self.read += 1
            item = self._check(raw, url, quiet)
            if item is not None:
                chunk.append((url, *item))
        return [chunk[i] for i in rng.permutation(len(chunk))]


def _batches(plan: _Plan, stream: int, state: dict[str, Any]) -> Iterator[tuple[Tensor | None, Any, dict[str, Any]]]:
    """Decoded batches of one stream with its position after each; on a DataError, one last
    item ``(None, message, state)`` (a worker cannot raise it cleanly across processes)."""
    st = _Stream(plan, stream, state)
    r, b = plan.resolution, plan.batch_size
    slots = np.empty((b, r, r, 3), dtype=np.uint8)  # decoded images are copied straight in
    captions: list[str] = []
    try:
        for url, key, image, caption in st.items():
            try:
                slots[len(captions)] = load_image(image, r, draft=plan.config.jpeg_draft,
                                                  max_pixels=plan.config.max_pixels, min_size=plan.config.min_image_size)
            except ImageTooSmall:
                st.filtered += 1
                continue
            except ImageTooLarge as exc:
                st.bad("oversized_image", url, f"sample {key}: {exc} (data.max_pixels)")
                continue
            except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the image is unusable
                st.bad("undecodable_image", url, f"sample {key}: {type(exc).__name__}: {exc}")
                continue
            captions.append(caption)
            if len(captions) == b:
                # One gather does the layout change (BHWC -> BCHW) and the scaling to [-1, 1]:
                # several times faster than a strided copy followed by arithmetic passes.
                yield torch.from_numpy(_UNIT[slots.transpose(0, 3, 1, 2)]), captions, st.state()
                captions = []
    except DataError as exc:
        yield None, str(exc), st.state()


class _Workers(IterableDataset):
    """What each DataLoader worker runs: worker ``i`` serves stream ``(i + rotate) % S``, so
    that the loader's round-robin continues where the consumed batches stopped."""

    def __init__(self, plan: _Plan, states: list[dict[str, Any]], rotate: int) -> None:
        self.plan = plan
        self.states = states
        self.rotate = rotate

    def __iter__(self) -> Iterator[tuple[Tensor | None, Any, int, dict[str, Any]]]:
        info = get_worker_info()
        stream = ((info.id if info is not None else 0) + self.rotate) % self.plan.streams
        for images, captions, state in _batches(self.plan, stream, self.states[stream]):
            yield images, captions, stream, state


def _identity(x: Any) -> Any:
    return x


# --- the rank's data stream ---------------------------------------------------------------------
class WebDatasetStream:
    """Endless batches of one rank (see the module docstring). One live iterator at a time:
    a new ``iter()`` continues from the last consumed batch."""

    def __init__(
        self, config: WebDatasetConfig, *, resolution: int, batch_size: int, rank: int, world_size: int, seed: int
    ) -> None:
        if resolution < 1 or batch_size < 1:
            raise ValueError(f"webdataset: resolution and batch_size must be >= 1, got {resolution} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"webdataset: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"webdataset: the run seed must be >= 0, got {seed}")
        urls = [config.urls] if isinstance(config.urls, str) else list(config.urls)
        register_fsspec_openers([u.split("://", 1)[0] for u in urls if "://" in u])
        shards = resolve_shards(config.urls, config.storage_options)
        streams = max(1, config.workers)
        if not config.resample and len(shards) < world_size * streams:
            raise DataError(
                f"webdataset: {len(shards)} shards cannot feed {world_size} ranks x {streams} workers without "
                f"repeating shards within an epoch: write more, smaller shards, lower data.workers, or set "
                f"data.resample: true"
            )
        self.config = config
        self._plan = _Plan(config, shards, resolution=resolution, batch_size=batch_size, rank=rank,
                           world_size=world_size, seed=seed)
        self._states = [self._plan.fresh() for _ in range(streams)]
        self._batches = 0  # consumed on this rank

    @property
    def shards(self) -> list[str]:
        return list(self._plan.shards)

    def __iter__(self) -> Iterator[Batch]:
        plan = self._plan
        streams = plan.streams
        if self.config.workers == 0:
            source: Iterator[tuple[Any, Any, int, dict[str, Any]]] = (
                (images, captions, 0, state) for images, captions, state in _batches(plan, 0, self._states[0])
            )
        else:
            pin = self.config.pin_memory if self.config.pin_memory is not None else torch.cuda.is_available()
            source = iter(DataLoader(
                _Workers(plan, self._states, self._batches % streams), batch_size=None, num_workers=streams,
                prefetch_factor=self.config.prefetch, pin_memory=pin, collate_fn=_identity,
            ))
        try:
            for images, captions, stream, state in source:
                if stream != self._batches % streams:
                    raise RuntimeError(
                        f"webdataset: got a batch of stream {stream}, expected {self._batches % streams}"
                    )
                self._states[stream] = state
                if images is None:
                    raise DataError(captions)
                self._batches += 1
                self._check_budget()
                yield Batch(images, captions)
        finally:
            # A raised error's traceback keeps this frame alive; drop the loader now so that
            # its workers stop here instead of whenever the garbage collector gets to them.
            source = None  # noqa: F841

    def _totals(self) -> tuple[Counter[str], int, Counter[str]]:
        problems: Counter[str] = Counter()
        shards: Counter[str] = Counter()
        for s in self._states:
            problems.update(s["problems"])
            shards.update(s["shards"])
        return problems, sum(s["read"] for s in self._states), shards

    def _check_budget(self) -> None:
        problems, read, shards = self._totals()
        if _over_budget(self.config, sum(problems.values()), read):
            raise DataError(_budget_message(self.config, self._plan.rank, problems, read, shards))

    def stats(self) -> dict[str, int]:
        """Problems by reason (every key of :data:`REASONS`), ``corrupt`` (their sum), ``filtered_small``,
        ``samples_read`` and ``epoch`` (the least advanced stream's) on this rank."""
        problems, read, _ = self._totals()
        out = {reason: int(problems.get(reason, 0)) for reason in REASONS}
        out["corrupt"] = sum(out.values())
        out["filtered_small"] = sum(int(s.get("filtered", 0)) for s in self._states)
        out["samples_read"] = read
        out["epoch"] = min(s["head"]["epoch"] for s in self._states)
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last consumed batch."""
        p = self._plan
        return {"version": _STATE_VERSION, "rank": p.rank, "world_size": p.world_size, "streams": p.streams,
                "digest": p.digest, "batches": self._batches, "stream_states": json.loads(json.dumps(self._states))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly when ``state`` was written by this rank of the same world size, with
        the same workers, shards, seed and shuffling. Otherwise (e.g. rank 0's state under a new
        world size) every stream starts the epoch after the most advanced one in ``state``;
        rank 0 keeps the problem counters. A warning says which happened."""
        if state.get("version") != _STATE_VERSION or "stream_states" not in state:
            raise DataError(f"webdataset: unrecognised data position (version {state.get('version')!r}); "
                            "the checkpoint was written by another dataset or vermeer version")
        p = self._plan
        same = (state["rank"], state["world_size"], state["streams"], state["digest"]) == (
            p.rank, p.world_size, p.streams, p.digest)
        if same:
            self._states = json.loads(json.dumps(state["stream_states"]))
            self._batches = int(state["batches"])
            return
        epoch = max(int(s["head"]["epoch"]) for s in state["stream_states"]) + 1
        self._states = [p.fresh(epoch) for _ in range(p.streams)]
        self._batches = 0
        if p.rank == 0:
            first = self._states[0]
            for s in state["stream_states"]:
                first["read"] += int(s["read"])
                first["problems"] = dict(Counter(first["problems"]) + Counter(s["problems"]))
        if (state["rank"], state["world_size"], state["streams"]) != (p.rank, p.world_size, p.streams):
            why = (f"written by rank {state['rank']} of {state['world_size']} with {state['streams']} streams, "
                   f"now rank {p.rank} of {p.world_size} with {p.streams}")
        else:
            why = "the shards, seed, shuffling or sample keys changed"
        log.warning("webdataset: data position not resumable exactly (%s): starting epoch %d on every stream; the "
                    "unread rest of the interrupted epoch is skipped", why, epoch)


def build_webdataset(
    config: WebDatasetConfig, *, resolution: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0
) -> WebDatasetStream:
    """Factory of dataset ``webdataset`` (see :mod:`vermeer_core.interfaces`)."""
    return WebDatasetStream(config, resolution=resolution, batch_size=batch_size, rank=rank, world_size=world_size,
                            seed=seed)


@hookimpl
def vermeer_register(registry: Any) -> None:
    registry.add("dataset", "webdataset", build_webdataset, WebDatasetConfig)


@hookimpl
def vermeer_data_commands(subparsers: Any) -> None:
    """``vermeer data inspect`` (summarise shards) and ``from-folder`` (a folder of captioned
    images as shards)."""
    from vermeer_plugins.data_commands import add_from_folder, add_inspect

    add_inspect(subparsers)
    add_from_folder(subparsers)
