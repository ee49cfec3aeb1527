"""Synthetic scenes written as webdataset shards (``vermeer data synth``): real tar files with
exactly the ``synthetic`` dataset's images and captions, for testing the shard path end to end."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

from vermeer_plugins.shards import IMAGE_FORMATS, encode_image, write_shards
from vermeer_plugins import synthetic

__all__ = ["synth_shards"]


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
    :func:`vermeer_plugins.synthetic.score`). Shards appear under their final names only when
    complete (see :func:`vermeer_plugins.shards.write_shards`). Returns the shard URLs.
    """
    if n < 1 or resolution < 1 or shard_size < 1:
        raise ValueError(f"synth: n, resolution and shard_size must be >= 1, got {n}, {resolution}, {shard_size}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"synth: image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")

    def samples() -> Iterator[dict[str, Any]]:
        for i in range(n):
            s = synthetic.scene(seed, i)
            yield {
                "__key__": f"{i:08d}",
                image_format: encode_image(synthetic.render(s, resolution), image_format),
                "txt": synthetic.caption(s).encode(),
                "json": json.dumps(dataclasses.asdict(s)).encode(),
            }

    return write_shards(out, samples(), shard_size=shard_size, progress=progress, storage_options=storage_options)
