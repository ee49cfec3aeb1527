"""text_encoder ``tiny``: tokenizer, shapes, padding mask, the empty caption, gradients."""

from __future__ import annotations

import pydantic
import pytest
import torch

from vermeer_core.interfaces import TextEmbedding
from vermeer_core.plugins import get_registry
from vermeer_plugins.text import BOS, EOS, PAD, TinyTextConfig, build_tiny, tokenize, tokenize_words


@pytest.fixture
def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_tiny(TinyTextConfig(dim=32, depth=2, heads=4, max_tokens=24)).eval()


def test_tokenize_frames_bytes_and_pads_to_the_longest_caption() -> None:
    ids, mask = tokenize(["ab", "", "é"], max_tokens=64)
    assert ids.tolist() == [[BOS, 97, 98, EOS], [BOS, EOS, PAD, PAD], [BOS, 0xC3, 0xA9, EOS]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False], [True] * 4]
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool


def test_tokenize_truncates_trailing_bytes_and_keeps_eos() -> None:
    ids, mask = tokenize(["x" * 100, "short"], max_tokens=16)
    assert ids.shape == (2, 16) and mask[0].all()
    assert ids[0].tolist() == [BOS] + [ord("x")] * 14 + [EOS]
    with pytest.raises(TypeError, match="sequence of captions"):
        tokenize("a red circle", max_tokens=16)


def test_shapes_and_dim(encoder: torch.nn.Module) -> None:
    out = encoder(["a small red circle", "two yellow squares", ""])
    assert isinstance(out, TextEmbedding) and encoder.dim == 32
    length = len("two yellow squares") + 2
    assert out.tokens.shape == (3, length, 32) and out.mask.shape == (3, length)
    assert out.pooled.shape == (3, 32)
    assert out.mask.sum(1).tolist() == [len("a small red circle") + 2, length, 2]
    assert (out.tokens[~out.mask] == 0).all()  # padded positions carry nothing
    torch.testing.assert_close(out.pooled, out.tokens.sum(1) / out.mask.sum(1, keepdim=True))


def test_padding_does_not_change_a_caption(encoder: torch.nn.Module) -> None:
    alone = encoder(["a red circle"])
    padded = encoder(["a red circle", "a large green triangle left of a small blue square"])
    n = alone.tokens.shape[1]
    assert padded.tokens.shape[1] > n
    torch.testing.assert_close(padded.tokens[0, :n], alone.tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.pooled[0], alone.pooled[0], atol=1e-5, rtol=1e-5)


def test_empty_caption_is_a_valid_input(encoder: torch.nn.Module) -> None:
    out = encoder([""])
    assert out.mask.tolist() == [[True, True]]
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    # The unconditional embedding differs from a real caption's.
    assert not torch.allclose(out.pooled, encoder(["a red circle"]).pooled)


def test_gradients_reach_every_parameter(encoder: torch.nn.Module) -> None:
    out = encoder(["a small red circle above a large blue square", ""])
    (out.tokens.square().mean() + out.pooled.sum()).backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_output_follows_the_module_dtype() -> None:
    enc = build_tiny(TinyTextConfig(dim=16, heads=2, depth=1)).double()
    assert enc(["a"]).tokens.dtype == torch.float64


def test_config_rejects_heads_that_do_not_divide_dim() -> None:
    with pytest.raises(pydantic.ValidationError, match="multiple of heads"):
        TinyTextConfig(dim=30, heads=4)
    with pytest.raises(pydantic.ValidationError):
        TinyTextConfig(max_tokens=2)


def test_registry_builds_tiny() -> None:
    reg = get_registry()
    assert "tiny" in reg.names("text_encoder")
    cfg = reg.parse("text_encoder", {"type": "tiny", "dim": 16, "heads": 2, "depth": 1})
    enc = reg.build(cfg, "text_encoder")
    assert enc.dim == 16 and enc([""]).pooled.shape == (1, 16)


def test_tokenize_words_hashes_lower_cased_words_and_punctuation() -> None:
    n = 4096
    ids, mask = tokenize_words(["A red circle, a RED square", ""], max_tokens=64, buckets=n)
    bos, eos, pad = n, n + 1, n + 2
    assert ids.shape == (2, 9) and mask.tolist()[1] == [True, True] + [False] * 7
    row = ids[0].tolist()
    assert row[0] == bos and row[-1] == eos and ids[1, 2:].eq(pad).all()
    words = row[1:-1]  # a red circle , a red square
    assert words[0] == words[4] and words[1] == words[5]  # same word (any case), same id
    assert len({words[0], words[1], words[2], words[3], words[6]}) == 5
    assert all(0 <= w < n for w in words)
    # stable across processes: CRC-32, not Python's salted hash()
    assert ids.tolist() == tokenize_words(["a red circle, a red square", ""], 64, n)[0].tolist()
    short, _ = tokenize_words(["one two three four"], max_tokens=4, buckets=n)
    full, _ = tokenize_words(["one two"], max_tokens=64, buckets=n)
    assert short.tolist() == full.tolist()  # keeps the first max_tokens - 2 words, ends in EOS


def test_word_encoder_tells_the_synthetic_vocabulary_apart() -> None:
    """Every word of the synthetic captions gets its own id at the default bucket count."""
    from vermeer_plugins.synthetic import COLOURS, RELATIONS, SHAPES

    words = {*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), "a", "small", "large", "two", "three", "and"}
    words |= {w for r in RELATIONS for w in r.split()}
    ids = tokenize_words([" ".join(sorted(words))], max_tokens=64, buckets=4096)[0][0, 1:-1]
    assert len(set(ids.tolist())) == len(words)
    enc = build_tiny(TinyTextConfig(dim=16, heads=2, depth=1, tokens="words"))
    out = enc(["a large red circle", ""])
    assert out.tokens.shape == (2, 6, 16) and out.mask.sum(1).tolist() == [6, 2]
    assert enc.embed.num_embeddings == 4096 + 3
