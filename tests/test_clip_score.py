"""metric ``clip``: CLIP score on a CLIP saved locally (here a tiny random one
built offline: the plumbing, not CLIP's judgement), and a clear error without weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vermeer_core.errors import VermeerError
from vermeer_core.interfaces import EvalPrompt
from vermeer_core.plugins import get_registry

transformers = pytest.importorskip("transformers")


def tiny_clip(path: Path) -> Path:
    """A randomly initialised CLIP (32 px, 1 layer) + processor, written with save_pretrained."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(path)
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = transformers.CLIPConfig(
        text_config={**small, "vocab_size": len(vocab), "max_position_embeddings": 77},
        vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=16,
    )
    transformers.CLIPModel(cfg).save_pretrained(path)
    return path


def build(model: str):
    reg = get_registry()
    return reg.build(reg.parse("metric", {"type": "clip", "model": model}), "metric", device=torch.device("cpu"))


def test_clip_scores_with_local_weights(tmp_path: Path) -> None:
    metric = build(str(tiny_clip(tmp_path)))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = [EvalPrompt(c) for c in ("a red circle", "two blue squares", "a green triangle", "a pink square")]
    metric.update(images[:2], prompts[:2])
    metric.update(images[2:], prompts[2:])
    both = metric.compute()["clip"]
    metric.reset()
    metric.update(images, prompts)
    assert metric.compute()["clip"] == pytest.approx(both, rel=1e-5)  # batches accumulate
    assert 0.0 <= both <= 100.0
    # by hand: 100 * max(cos, 0) of the projected embeddings, mean over images
    m, proc = metric.model, metric.processor
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    inputs = proc(text=[p.caption for p in prompts], images=list(pixels), return_tensors="pt", padding=True)
    with torch.no_grad():
        img = m.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
        txt = m.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output
        cos = torch.nn.functional.cosine_similarity(m.visual_projection(img), m.text_projection(txt), dim=-1)
    assert both == pytest.approx(float((100 * cos.clamp_min(0)).mean()), rel=1e-4)


def test_clip_without_weights_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(VermeerError, match="not a local CLIP directory.*save_pretrained"):
        build(str(tmp_path / "missing"))
