"""The built-in tiny text model: a small, randomly initialised Llama with a SentencePiece tokenizer trained on
the recipe's text, written as an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer) so
that it loads like any downloaded model, with no download. `TextEncoderConfig(name_or_path="builtin-tiny")`
builds it on first use into the cache folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

BUILTIN_TINY = "builtin-tiny"
CACHE_ENV = "INTERN25_CACHE_DIR"
TINY_FOLDER_NAME = "tiny-text-model"
BUILD_INFO_FILE = "intern25_build.json"  # written last: its presence means the folder is complete
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", BUILD_INFO_FILE)
OWN_FILES = REQUIRED_FILES + ("tokenizer.model", "special_tokens_map.json", "generation_config.json")


def cache_dir() -> Path:
    """The project's cache: $INTERN25_CACHE_DIR, else $XDG_CACHE_HOME/intern25, else ~/.cache/intern25."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "intern25"


def default_tiny_text_model_folder() -> Path:
    """Where "builtin-tiny" lives: <cache_dir()>/tiny-text-model."""
    return cache_dir() / TINY_FOLDER_NAME


def build_tiny_text_model(folder: str | os.PathLike | None = None, texts: Iterable[str] | None = None,
                          hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int | None = None,
                          intermediate_size: int | None = None, max_positions: int = 128,
                          vocab_size: int = 1000, tokenizer_type: str = "bpe", seed: int = 0) -> Path:
    """Writes the tiny text model into `folder` (default: `default_tiny_text_model_folder()`) and returns it.

    `texts` (default: the shapes corpus of `data_recipes.text_corpus`) train the tokenizer; the weights are
    drawn from a generator seeded by `seed`, so the same arguments give the same files. A folder already built
    with the same arguments is reused as it is; one built with other arguments is rebuilt. The build goes to a
    temporary folder that is renamed into place, so concurrent builders (one per rank) do not collide."""
    # The tokenizer recipe and the corpus are the data layer's; they import nothing from the model packages.
    from data_recipes.text_corpus import shapes_corpus
    from data_recipes.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

    folder = Path(folder) if folder is not None else default_tiny_text_model_folder()
    texts = list(texts) if texts is not None else shapes_corpus()
    build = {"hidden_size": hidden_size, "layers": layers, "heads": heads, "kv_heads": kv_heads or heads,
             "intermediate_size": intermediate_size or 4 * hidden_size, "max_positions": max_positions,
             "vocab_size": vocab_size, "tokenizer_type": tokenizer_type, "seed": seed,
             "texts_sha256": hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()}
    if _read_build_info(folder) == build:
        return folder

    from transformers import LlamaConfig, LlamaModel

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tokenizer_folder = train_tokenizer(texts, staging, vocab_size=vocab_size, model_type=tokenizer_type,
                                           seed=seed, model_max_length=max_positions)
        from transformers import AutoTokenizer
        vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_folder)))
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden_size, intermediate_size=build["intermediate_size"],
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=build["kv_heads"],
            max_position_embeddings=max_positions, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
            pad_token_id=PAD_ID, tie_word_embeddings=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaModel(config)
        model.save_pretrained(str(staging), safe_serialization=True)
        (staging / BUILD_INFO_FILE).write_text(json.dumps(build, indent=2) + "\n")
        _move_into_place(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _read_build_info(folder: Path) -> dict | None:
    if not all((folder / name).is_file() for name in REQUIRED_FILES):
        return None
    try:
        return json.loads((folder / BUILD_INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def _move_into_place(staging: Path, folder: Path) -> None:
    if folder.exists():
        # An incomplete or outdated build is replaced; a folder holding anything else is not ours to delete.
        foreign = [p.name for p in folder.iterdir() if p.name not in OWN_FILES] if folder.is_dir() else [folder.name]
        if foreign:
            raise FileExistsError(f"tiny text model folder {folder} holds files it did not write "
                                  f"({', '.join(foreign)}); remove them or choose another folder")
        shutil.rmtree(folder, ignore_errors=True)
    try:
        staging.rename(folder)
    except OSError:
        # Another process renamed its build into place first: theirs is as good as ours.
        if _read_build_info(folder) is None:
            raise
