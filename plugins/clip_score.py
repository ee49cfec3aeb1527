"""metric ``clip``: CLIP score (Hessel et al. 2021; the paper evaluates CLIPScore) of generated
images against their prompts, with a CLIP that transformers loads from the user's disk.

Written on transformers directly, not torchmetrics' ``CLIPScore``: torchmetrics 1.9 reads
``get_image_features`` as a tensor, which transformers 5 returns wrapped (pooler_output), and
fails there. The definition is torchmetrics': 100 x cosine similarity of the image and caption
embeddings, floored at 0, averaged over images.

vermeer never downloads: ``model`` must be a local directory written by transformers'
``save_pretrained`` (a ``CLIPModel`` and its ``CLIPProcessor``), e.g. after
``CLIPModel.from_pretrained("openai/clip-vit-base-patch16").save_pretrained(DIR)`` on a
machine with access. Needs ``pip install 'vermeer[clip]'`` (transformers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from vermeer_core.api import ComponentConfig, EvalPrompt, hookimpl, VermeerError

__all__ = ["CLIPConfig", "CLIPMetric", "vermeer_register"]


class CLIPConfig(ComponentConfig):
    """Where the CLIP weights are."""

    model: str = Field(..., description="local directory of a CLIPModel + CLIPProcessor (save_pretrained)")


def _load(path: str, device: torch.device) -> tuple[Any, Any]:
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as exc:
        raise VermeerError(f"metric clip needs transformers: pip install 'vermeer[clip]' ({exc})") from None
    where = Path(path).expanduser()
    if not (where / "config.json").is_file():
        raise VermeerError(
            f"metric clip: {path!r} is not a local CLIP directory (no config.json). vermeer does not "
            "download weights: save a CLIPModel and its CLIPProcessor there with save_pretrained"
        )
    model = CLIPModel.from_pretrained(where, local_files_only=True).eval().requires_grad_(False).to(device)
    return model, CLIPProcessor.from_pretrained(where, local_files_only=True)


def _embedding(out: Any) -> Tensor:
    """Projected embeddings from ``get_*_features``: a tensor (transformers 4) or an output
    whose ``pooler_output`` holds them (transformers 5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


class CLIPMetric:
    """Per-image CLIP scores (each / 100 is the image's score in [0, 1] for the grid, though
    no threshold makes it pass or fail: ``update`` returns None)."""

    needs_references = False

    def __init__(self, config: CLIPConfig, device: torch.device) -> None:
        self.device = device
        self.model, self.processor = _load(config.model, device)
        self.reset()

    def reset(self) -> None:
        self._scores: list[Tensor] = []

    @torch.no_grad()
    def update(
        self, images: Tensor, prompts: Sequence[EvalPrompt], references: Tensor | None = None
    ) -> None:
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        inputs = self.processor(text=[p.caption for p in prompts], images=list(pixels), return_tensors="pt",
                                padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = _embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = _embedding(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                      attention_mask=inputs["attention_mask"]))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        self._scores.append((100 * cos.clamp_min(0)).cpu())
        return None

    def compute(self) -> dict[str, float]:
        if not self._scores:
            raise ValueError("clip: no images were scored")
        return {"clip": float(torch.cat(self._scores).mean())}


def build_clip(config: CLIPConfig, *, device: torch.device | None = None) -> CLIPMetric:
    """Factory of metric ``clip``: clear error when the packages or the weights are missing."""
    return CLIPMetric(config, device or torch.device("cpu"))


@hookimpl
def vermeer_register(registry: Any) -> None:
    registry.add("metric", "clip", build_clip, CLIPConfig)
