"""The tokenizer recipe: trains the SentencePiece model of the built-in text encoder on the recipe's text and
saves it as a Hugging Face tokenizer folder that `AutoTokenizer.from_pretrained(folder)` loads offline.

    python -m data_recipes.tokenizer --out runs/tokenizer                      # the built-in shapes corpus
    python -m data_recipes.tokenizer --texts captions.txt --out DIR --vocab-size 2000

The Hugging Face tokenizer is built directly from the SentencePiece pieces (no protobuf, no slow-tokenizer
conversion) and gives the same ids as SentencePiece itself; the ids of the special tokens are those of the
built-in Llama-style text model.
"""
from __future__ import annotations

import argparse
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

# Ids fixed by the built-in text model's configuration (Llama's unk/bos/eos order, plus a pad token).
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SPM_FILE = "tokenizer.model"
MODEL_TYPES = ("bpe", "unigram")
SPACE = "\u2581"  # SentencePiece's visible space


def train_sentencepiece(texts: Iterable[str], output_dir: str | os.PathLike, vocab_size: int = 1000,
                        model_type: str = "bpe", seed: int = 0) -> Path:
    """Trains a SentencePiece model on `texts` (one sentence per item; items with newlines are split) and
    writes `output_dir/tokenizer.model`. Deterministic: one thread, a fixed seed, no sampling of the input.

    `vocab_size` is an upper bound: a corpus too small for it gets the largest vocabulary it supports. The
    vocabulary has byte fallback (any text encodes, nothing becomes <unk>) and no normalisation, so decoding
    gives back the text."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}: expected one of {MODEL_TYPES}")
    lines = [line for text in texts for line in str(text).splitlines() if line.strip()]
    if not lines:
        raise ValueError("train_sentencepiece: no text to train on")
    # 256 byte pieces + 4 special tokens come first; below that SentencePiece refuses to train.
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size}: must be at least 300 (256 byte-fallback pieces + specials)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        hard_vocab_limit=False, character_coverage=1.0, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        unk_piece=SPECIAL_TOKENS["unk_token"], bos_piece=SPECIAL_TOKENS["bos_token"],
        eos_piece=SPECIAL_TOKENS["eos_token"], pad_piece=SPECIAL_TOKENS["pad_token"],
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    path = output_dir / SPM_FILE
    path.write_bytes(model.getvalue())
    return path


def hf_tokenizer_from_sentencepiece(model_file: str | os.PathLike, model_max_length: int | None = None):
    """A `PreTrainedTokenizerFast` equivalent to the SentencePiece model in `model_file` (bpe or unigram): the
    same ids for every text (except special-token strings such as "<s>" written in a text, which Hugging Face
    tokenizers read as the special token), byte fallback, a BOS token in front of every sequence, right
    padding."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast

    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"SentencePiece model {model_file}: no such file")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    specials = {sp.id_to_piece(i) for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)}
    if [pieces[i] for i in (UNK_ID, BOS_ID, EOS_ID, PAD_ID)] != list(SPECIAL_TOKENS.values()):
        raise ValueError(f"SentencePiece model {model_file}: special tokens must be {SPECIAL_TOKENS} at ids "
                         f"0-3, found {pieces[:4]}; train it with data_recipes.tokenizer.train_sentencepiece")
    if _is_unigram(sp):
        model = Unigram([(p, sp.get_score(i)) for i, p in enumerate(pieces)], unk_id=UNK_ID, byte_fallback=True)
    else:
        vocab = {p: i for i, p in enumerate(pieces)}
        model = BPE(vocab=vocab, merges=_bpe_merges(sp, vocab), unk_token=SPECIAL_TOKENS["unk_token"],
                    fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    # SentencePiece's own pre-processing: a space in front of the text, spaces made visible, pieces that never
    # span a space (so "  x" keeps both spaces, which a Metaspace pre-tokenizer would fold into one).
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.pre_tokenizer = pre_tokenizers.Split(SPACE, behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1, right=0)])
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)])
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in sorted(specials)])
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="right",
                                   clean_up_tokenization_spaces=False, **SPECIAL_TOKENS, **kwargs)


def _is_unigram(sp) -> bool:
    # A BPE model's scores are minus the merge rank; a unigram model's are log-probabilities. The trainer
    # spec says it outright, but reading it needs protobuf: the scores say it too.
    normal = [sp.get_score(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    return not all(float(s).is_integer() for s in normal)


def _bpe_merges(sp, vocab: dict[str, int]) -> list[tuple[str, str]]:
    # SentencePiece BPE merges the adjacent pair whose concatenation is the best-ranked piece; so every split
    # of a piece into two pieces is a merge, ranked by the piece's id (as transformers' own converter does).
    merges = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        splits = [(vocab[piece[:k]], vocab[piece[k:]]) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(sp.id_to_piece(a), sp.id_to_piece(b)) for a, b in sorted(splits)]
    return merges


def save_hf_tokenizer(model_file: str | os.PathLike, folder: str | os.PathLike,
                      model_max_length: int | None = None) -> Path:
    """Writes the Hugging Face tokenizer of a SentencePiece model (tokenizer.json, tokenizer_config.json, and
    the SentencePiece model itself as tokenizer.model) into `folder`."""
    folder = Path(folder)
    tokenizer = hf_tokenizer_from_sentencepiece(model_file, model_max_length)
    tokenizer.save_pretrained(str(folder))
    # transformers 5 names the class "TokenizersBackend", which transformers 4 does not know; both load this.
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    if Path(model_file).resolve() != (folder / SPM_FILE).resolve():
        (folder / SPM_FILE).write_bytes(Path(model_file).read_bytes())
    return folder


def train_tokenizer(texts: Iterable[str] | None, folder: str | os.PathLike, vocab_size: int = 1000,
                    model_type: str = "bpe", seed: int = 0, model_max_length: int | None = None) -> Path:
    """The recipe: SentencePiece trained on `texts` (default: the built-in shapes corpus), saved as a Hugging
    Face tokenizer folder. Returns the folder."""
    if texts is None:
        from .text_corpus import shapes_corpus
        texts = shapes_corpus()
    model_file = train_sentencepiece(texts, folder, vocab_size, model_type, seed)
    return save_hf_tokenizer(model_file, folder, model_max_length)


def read_texts(path: str | os.PathLike) -> list[str]:
    """One text per line of a UTF-8 file; a .jsonl file gives the "text" (or "caption") field of each line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"texts file {path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = json.loads(line)
        text = record.get("text", record.get("caption")) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{number}: expected an object with a \"text\" or \"caption\" string")
        texts.append(text)
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_recipes.tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", help="a text file, one text per line (or .jsonl with a 'text' field); "
                                        "default: the built-in shapes corpus")
    parser.add_argument("--out", required=True, help="the tokenizer folder to write")
    parser.add_argument("--vocab-size", type=int, default=1000, help="upper bound on the vocabulary size")
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    texts = read_texts(args.texts) if args.texts else None
    folder = train_tokenizer(texts, args.out, args.vocab_size, args.model_type, args.seed)
    from transformers import AutoTokenizer
    print(f"wrote {folder} ({len(AutoTokenizer.from_pretrained(str(folder)))} tokens)")


if __name__ == "__main__":
    main()
