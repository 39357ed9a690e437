"""Attention masks of the shared decoder, built from a sequence layout.

Every mask is boolean with True = "this query may attend to this key", the convention of
`torch.nn.functional.scaled_dot_product_attention`. A mask is (L, L) when it is the same for the whole
batch and (B, L, L) when padding makes it differ per sample; rows are queries, columns are keys.

Padded positions are hidden as keys from every query. A padded query row sees only itself: a row with no
True at all would make softmax return NaN, and its output is ignored anyway.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def valid_from_lengths(lengths: Tensor, max_length: int | None = None) -> Tensor:
    """(B,) lengths -> (B, max_length) boolean, True for real tokens (the first `length` positions)."""
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be a 1-D tensor of sequence lengths, got shape {tuple(lengths.shape)}")
    max_length = int(lengths.max()) if max_length is None else max_length
    if lengths.numel() and int(lengths.max()) > max_length:
        raise ValueError(f"a length of {int(lengths.max())} does not fit in max_length={max_length}")
    return torch.arange(max_length, device=lengths.device) < lengths[:, None]


def with_padding(mask: Tensor, valid: Tensor) -> Tensor:
    """Applies per-sample padding to a layout mask: (L, L) or (B, L, L) and valid (B, L) -> (B, L, L).

    Padded keys are hidden from every query; a padded query sees only itself (so no row is empty).
    """
    if valid.dim() != 2 or valid.shape[-1] != mask.shape[-1]:
        raise ValueError(f"valid must be (B, {mask.shape[-1]}), got shape {tuple(valid.shape)}")
    valid = valid.to(torch.bool)
    mask = mask.to(torch.bool) & valid[:, None, :]
    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    padded_rows = ~valid[:, :, None]
    return torch.where(padded_rows, eye, mask)


def bidirectional_mask(valid: Tensor | None = None, *, lengths: Tensor | None = None,
                       length: int | None = None) -> Tensor:
    """Every real token sees every real token (classification, retrieval, VQA, targets).

    Give `valid` (B, L) booleans (True = real token) or `lengths` (B,) [with `length` = L], which return
    (B, L, L); or only `length` for an unpadded (L, L) mask of all True.
    """
    if valid is None and lengths is not None:
        valid = valid_from_lengths(lengths, length)
    if valid is None:
        if length is None:
            raise ValueError("bidirectional_mask needs valid, lengths or length")
        return torch.ones(length, length, dtype=torch.bool)
    length = valid.shape[-1]
    full = torch.ones(length, length, dtype=torch.bool, device=valid.device)
    return with_padding(full, valid)


def causal_mask(length: int, device: torch.device | str | None = None) -> Tensor:
    """Token i sees tokens 0..i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


@dataclass(frozen=True)
class CaptionLayout:
    """[<SPE>, prefix tokens..., words w_0..w_{n-1}, SPE queries q_0..q_{n-1}].

    `num_prefix` counts the leading <SPE> and everything before the words (image tokens, a prompt).
    Query q_j predicts word w_j: it sees the prefix, the words before j and itself. The words are causal.
    Because a query never sees w_j nor another query, all n predictions train in one parallel pass and
    inference (append one query after the prefix and the words generated so far) uses the same mask.
    """
    num_prefix: int
    num_words: int

    def __post_init__(self):
        if self.num_prefix < 1 or self.num_words < 0:
            raise ValueError(f"a caption layout needs num_prefix >= 1 (the <SPE>) and num_words >= 0, "
                             f"got num_prefix={self.num_prefix}, num_words={self.num_words}")

    @property
    def length(self) -> int:
        return self.num_prefix + 2 * self.num_words

    @property
    def prefix(self) -> slice:
        return slice(0, self.num_prefix)

    @property
    def words(self) -> slice:
        return slice(self.num_prefix, self.num_prefix + self.num_words)

    @property
    def queries(self) -> slice:
        return slice(self.num_prefix + self.num_words, self.length)

    def attention_mask(self, device: torch.device | str | None = None) -> Tensor:
        """(length, length) boolean mask of this layout."""
        n = self.num_words
        mask = torch.zeros(self.length, self.length, dtype=torch.bool, device=device)
        mask[self.prefix, self.prefix] = True
        mask[self.words, self.prefix] = True
        mask[self.words, self.words] = causal_mask(n, device)
        mask[self.queries, self.prefix] = True
        # query j sees words 0..j-1: strictly lower triangular
        mask[self.queries, self.words] = causal_mask(n, device).tril(-1)
        mask[self.queries, self.queries] = torch.eye(n, dtype=torch.bool, device=device)
        return mask

    def position_ids(self, device: torch.device | str | None = None) -> Tensor:
        """(length,) positions: the prefix and the words count up; query j repeats the position of word j,
        which is also the position the query has at inference, one step at a time."""
        p, n = self.num_prefix, self.num_words
        prefix_and_words = torch.arange(p + n, device=device)
        return torch.cat([prefix_and_words, prefix_and_words[p:]])

    def valid(self, word_lengths: Tensor, prefix_valid: Tensor | None = None) -> Tensor:
        """(B, length) booleans for a batch whose captions have `word_lengths` (B,) real words (and whose
        prefixes have `prefix_valid` (B, num_prefix) real tokens, default all)."""
        words = valid_from_lengths(word_lengths, self.num_words)
        if prefix_valid is None:
            prefix_valid = torch.ones(words.shape[0], self.num_prefix, dtype=torch.bool, device=words.device)
        if prefix_valid.shape != (words.shape[0], self.num_prefix):
            raise ValueError(f"prefix_valid must be ({words.shape[0]}, {self.num_prefix}), "
                             f"got {tuple(prefix_valid.shape)}")
        return torch.cat([prefix_valid.to(torch.bool), words, words], dim=1)


def caption_attention_mask(num_prefix: int, num_words: int,
                           device: torch.device | str | None = None) -> Tensor:
    """(L, L) mask of the captioning layout, L = num_prefix + 2 * num_words; see `CaptionLayout`."""
    return CaptionLayout(num_prefix, num_words).attention_mask(device)


def padded_caption_attention_mask(num_prefix: int, word_lengths: Tensor, num_words: int | None = None,
                                  prefix_valid: Tensor | None = None) -> Tensor:
    """(B, L, L) captioning mask for a batch of captions padded to `num_words` (default the longest).

    Word and query slots past a caption's length are padding, as are prefix tokens where `prefix_valid`
    (B, num_prefix) is False (e.g. fewer region tokens in one image).
    """
    word_lengths = torch.as_tensor(word_lengths)
    num_words = int(word_lengths.max()) if num_words is None else num_words
    layout = CaptionLayout(num_prefix, num_words)
    mask = layout.attention_mask(word_lengths.device)
    return with_padding(mask, layout.valid(word_lengths, prefix_valid))
