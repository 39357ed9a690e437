"""The text encoder of the generalist model: any Hugging Face `transformers` model (an encoder such as BERT or a
decoder-only LLM), whose hidden states are projected to the decoder width. The language model is frozen,
adapted with LoRA or trained in full; the projection always trains.

    encoder = TextEncoder(TextEncoderConfig("builtin-tiny", width=256))
    features, mask = encoder(["a red circle left of a blue square", "two"])   # (2, L, 256), (2, L)
"""
from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .tiny_text_model import BUILTIN_TINY, build_tiny_text_model

MODES = ("frozen", "lora", "full")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class TextModelNotFoundError(FileNotFoundError):
    """The text model cannot be loaded from where the configuration points: the message says what is missing."""


@dataclass
class TextEncoderConfig:
    """What the text encoder is and how it trains.

    name_or_path: a local folder holding a Hugging Face model and its tokenizer, a hub id, or "builtin-tiny"
        (built on first use into `uniperceiver.tiny_text_model.default_tiny_text_model_folder()`).
    width: the decoder width the hidden states are projected to.
    mode: "frozen" (no gradients, eval mode), "lora" (peft adapters on `lora_target_modules`, default: peft's
        choice for the architecture, e.g. q_proj/v_proj for Llama, query/value for BERT) or "full".
    hidden_layer: which hidden state to project; -1 is the last, 0 the embeddings.
    max_length: texts are truncated to this many tokens.
    dtype: the language model's weights ("float32", "bfloat16", "float16"); None keeps float32.
    """
    name_or_path: str = BUILTIN_TINY
    width: int = 256
    mode: str = "frozen"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    hidden_layer: int = -1
    max_length: int = 64
    dtype: str | None = None
    extra: dict = field(default_factory=dict)  # keyword arguments for AutoModel.from_pretrained

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"text encoder mode {self.mode!r}: expected one of {MODES}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"text encoder dtype {self.dtype!r}: expected one of {tuple(DTYPES)} or None")
        if self.width <= 0 or self.max_length <= 0 or self.lora_r <= 0:
            raise ValueError(f"text encoder width, max_length and lora_r must be positive, got {self.width}, "
                             f"{self.max_length}, {self.lora_r}")
        self.name_or_path = str(self.name_or_path)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping) -> TextEncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"text encoder config: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**values)


class TextEncoder(nn.Module):
    """A Hugging Face language model and its tokenizer, with a Linear + LayerNorm projection to `width`.

    `forward(texts)` returns `(features, mask)`: features (B, L, width), zero at padding, and a bool mask
    (B, L) that is True at real tokens. Padding is always on the right, so for a decoder-only model each text's
    features do not depend on the other texts of the batch.

    `load_weights=False` builds the language model from its config alone (random weights), for loading a
    state dict that holds them, as an exported generalist model does."""

    def __init__(self, config: TextEncoderConfig | Mapping | None = None, load_weights: bool = True, **overrides):
        super().__init__()
        if config is None:
            config = TextEncoderConfig.from_dict(overrides)
        elif isinstance(config, Mapping):
            config = TextEncoderConfig.from_dict({**config, **overrides})
        elif overrides:
            config = TextEncoderConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        source, local = resolve_text_model(config.name_or_path, need_weights=load_weights)
        self.tokenizer = _load_tokenizer(source, local)
        model = _load_model(source, local, load_weights, config)
        self._ensure_pad_token(model)
        self.hidden_size = _hidden_size(model.config)
        _check_layer(config.hidden_layer, model.config)
        self.model = self._apply_mode(model)
        self.proj = nn.Linear(self.hidden_size, config.width)
        self.norm = nn.LayerNorm(config.width)
        self.train(self.training)  # from_pretrained hands the model over in eval mode; follow this module

    @property
    def width(self) -> int:
        return self.config.width

    def _ensure_pad_token(self, model: nn.Module) -> None:
        tokenizer = self.tokenizer
        if tokenizer.pad_token is None:
            # Padding is masked out, so any existing token serves; a new one needs an embedding row.
            if tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token
            elif tokenizer.unk_token is not None:
                tokenizer.pad_token = tokenizer.unk_token
            else:
                tokenizer.add_special_tokens({"pad_token": "<pad>"})
                model.resize_token_embeddings(len(tokenizer))
        tokenizer.padding_side = "right"

    def _apply_mode(self, model: nn.Module) -> nn.Module:
        mode = self.config.mode
        if mode == "frozen":
            model.requires_grad_(False)
            model.eval()
        elif mode == "lora":
            from peft import LoraConfig, get_peft_model
            lora = LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha,
                              lora_dropout=self.config.lora_dropout, bias="none",
                              target_modules=self.config.lora_target_modules)
            try:
                model = get_peft_model(model, lora)  # freezes everything but the adapters
            except ValueError as error:
                raise ValueError(f"text encoder {self.config.name_or_path!r} ({model.config.model_type}): "
                                 f"LoRA cannot be applied ({error}); set lora_target_modules to the names of "
                                 f"its attention projections") from error
        else:
            model.requires_grad_(True)
        return model

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.config.mode == "frozen":
            self.model.eval()  # no dropout in a frozen model, whatever the rest of the network does
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the language model's activations in the backward pass (lora and full modes)."""
        base = self._base_model()
        # transformers 5 renames gradient_checkpointing_* to activation_checkpointing_*.
        if enable:
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.config.mode == "lora":
                base.enable_input_require_grads()
        else:
            (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()

    def _base_model(self) -> nn.Module:
        return self.model.get_base_model() if self.config.mode == "lora" else self.model

    def tokenize(self, texts: str | Sequence[str], offsets: bool = False) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, L), right-padded to the longest text, truncated to max_length; with
        `offsets`, also offset_mapping (B, L, 2), as `token_offsets` gives it, from the same tokenizer call."""
        if offsets:
            self._require_fast("tokenize(offsets=True)")
        batch = self._tokenizer_call(texts, "tokenize", return_offsets_mapping=offsets)
        keys = ("input_ids", "attention_mask") + (("offset_mapping",) if offsets else ())
        return {key: batch[key] for key in keys}

    def token_offsets(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(B, L, 2) each token's [start, end) characters in its text, aligned with `tokenize` (special and
        padding tokens are (0, 0)): where a phrase's tokens are, for losses on words. Needs a fast tokenizer."""
        self._require_fast("token_offsets")
        return self._tokenizer_call(texts, "token_offsets", return_offsets_mapping=True)["offset_mapping"]

    def _require_fast(self, caller: str) -> None:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"TextEncoder.{caller}: the tokenizer of {self.config.name_or_path!r} is not a "
                             "fast (Rust) tokenizer and gives no character offsets")

    def _tokenizer_call(self, texts: str | Sequence[str], caller: str, **extra):
        """The one tokenizer call behind `tokenize` and `token_offsets`, so that their tokens stay aligned."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError(f"TextEncoder.{caller}: no texts")
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.config.max_length,
                              return_tensors="pt", **extra)

    def forward(self, texts: str | Sequence[str] | Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts, or the output of `tokenize` -> (features (B, L, width), mask (B, L) bool)."""
        batch = texts if isinstance(texts, Mapping) else self.tokenize(texts)
        device = self.proj.weight.device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        layer = self.config.hidden_layer
        backbone = self._base_model()
        backbone = backbone.get_encoder() if backbone.config.is_encoder_decoder else None
        run = backbone if backbone is not None else self.model
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.mode != "frozen"):
            out = run(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=layer != -1)
        hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        features = self.norm(self.proj(hidden.to(self.proj.weight.dtype)))
        mask = attention_mask.bool()
        return features * mask.unsqueeze(-1), mask

    def save_text_model(self, folder: str | os.PathLike, weights: bool = True) -> Path:
        """Writes the tokenizer and the language model's config (and, with `weights`, its weights, LoRA merged
        in) into `folder`, a folder that `TextEncoderConfig(name_or_path=folder)` loads. Without weights the
        folder is for `TextEncoder(..., load_weights=False)` followed by loading a state dict."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        model = self.model
        if weights:
            if self.config.mode == "lora":
                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(str(folder), safe_serialization=True)
        else:
            self._base_model().config.save_pretrained(str(folder))
        return folder


def end_of_text_id(tokenizer) -> int | None:
    """The token that ends a generated text: end-of-sequence, or for BERT-style tokenizers, which have none,
    the [SEP] that closes every sequence they encode."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set, read now (huggingface_hub reads it once, at import)."""
    return any(os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_text_model(name_or_path: str, need_weights: bool = True) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local folder). "builtin-tiny" is built if needed; a
    local folder is checked for its config, weights and tokenizer, and a message names what it lacks."""
    if name_or_path == BUILTIN_TINY:
        return str(build_tiny_text_model()), True
    path = Path(name_or_path).expanduser()
    if path.exists() or not _HUB_ID.match(name_or_path):
        check_text_model_folder(path, need_weights)
        return str(path), True
    return name_or_path, False


def check_text_model_folder(folder: str | os.PathLike, need_weights: bool = True) -> None:
    folder = Path(folder)
    if not folder.is_dir():
        raise TextModelNotFoundError(f"text model folder {folder}: no such folder")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json (the model configuration)")
    if need_weights and not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(f"weights (one of {', '.join(WEIGHT_FILES)})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise TextModelNotFoundError(f"text model folder {folder} is missing " + "; ".join(missing))


def _from_pretrained(loader, source: str, local: bool, **kwargs):
    offline = hub_offline()
    try:
        return loader(source, local_files_only=local or offline, **kwargs)
    except OSError as error:
        if local:
            raise TextModelNotFoundError(f"text model folder {source}: {error}") from error
        hint = ("HF_HUB_OFFLINE=1 forbids downloading it" if offline
                else "it could not be downloaded (no network, a private repository, or a wrong id)")
        raise TextModelNotFoundError(
            f"text model {source!r} is not in the local Hugging Face cache and {hint}; pass a local folder, "
            f"or {BUILTIN_TINY!r} for the built-in tiny model") from error


def _load_tokenizer(source: str, local: bool):
    from transformers import AutoTokenizer
    return _from_pretrained(AutoTokenizer.from_pretrained, source, local)


def _load_model(source: str, local: bool, load_weights: bool, config: TextEncoderConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModel
    kwargs = dict(config.extra)
    dtype = DTYPES.get(config.dtype) if config.dtype else None
    if not load_weights:
        model_config = _from_pretrained(AutoConfig.from_pretrained, source, local)
        model = AutoModel.from_config(model_config)
        return model.to(dtype) if dtype is not None else model
    if dtype is not None:
        kwargs["dtype"] = dtype
    return _from_pretrained(AutoModel.from_pretrained, source, local, **kwargs)


def _hidden_size(model_config) -> int:
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(model_config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"text model config of type {model_config.model_type!r} names no hidden size "
                     f"(hidden_size, d_model, n_embd or dim)")


def _check_layer(index: int, model_config) -> None:
    layers = getattr(model_config, "num_hidden_layers", None)
    if isinstance(layers, int) and not -(layers + 1) <= index <= layers:
        raise ValueError(f"text encoder hidden_layer {index}: the model has {layers} layers, so hidden states "
                         f"0..{layers} (or -{layers + 1}..-1)")
