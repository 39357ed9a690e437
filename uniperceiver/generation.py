"""Caption decoding: beam search (greedy with one beam) over the caption vocabulary, using the decoder's
key/value cache so each step runs two new tokens instead of the whole sequence.

The prefix [SPE, image tokens, (prompt states)] runs once into the cache. Step j then feeds
[w_{j-1}, q_j]: the word is committed to the cache, the query is not, which reproduces the training mask
(query j sees the prefix, the words before j and itself). A prompt (a VQA question) makes the same machinery
answer open-ended questions.

`incremental_logits` runs exactly the step function of the search with forced words; the tests compare it
with the parallel, teacher-forced `UniPerceiver.caption_logits`.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .attributes import IMAGE_TEXT_INPUT, decoder_attributes
from .decoder import KVCache, Modality


class PrefixState(NamedTuple):
    """The decoder's cache after the prefix, and where each sample's first word goes."""
    cache: KVCache
    first_position: Tensor      # (B,) position id of word 0 (and of query 0)


class SearchResult(NamedTuple):
    """Best sequence per sample as indices into `model.caption_vocab` (B, T), end-of-sequence included
    where it was reached (and repeated after it), and its total log-probability (B,)."""
    word_indices: Tensor
    scores: Tensor


def packed_positions(valid: Tensor) -> Tensor:
    """(B, L) booleans -> (B, L) position ids counting real tokens only, so a sample's positions do not
    depend on how much padding its batch needed (padded tokens are masked out; they get the previous id)."""
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0)


def start(model, images: Tensor, prompts: Sequence[str] | None = None) -> PrefixState:
    """Runs [SPE, image tokens, prompt states] once and returns its cache."""
    decoder = model.decoder
    prefix, kinds, valid = model.generation_prefix(images, prompts)
    tokens, kinds = decoder.prepend_spe(prefix, kinds)
    valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
    positions = packed_positions(valid)
    attributes = decoder_attributes(decoder, kinds, IMAGE_TEXT_INPUT)  # the prefix: no causal span
    cache = decoder(tokens, kinds, positions, valid=valid, attributes=attributes, use_cache=True).cache
    return PrefixState(cache, valid.sum(dim=1))


def step(model, cache: KVCache, positions: Tensor, previous_words: Tensor | None,
         candidates: Tensor) -> tuple[Tensor, KVCache]:
    """One decoding step for every row of `cache`.

    positions (rows,): the position id of the query (the word being predicted).
    previous_words (rows, width) features of the word chosen at the last step, or None at the first step.
    candidates (V, D): the vocabulary embeddings the query is ranked against.
    Returns the logits (rows, V) and the cache with the previous word appended.
    """
    decoder, readout = model.decoder, model.readout
    rows = positions.shape[0]
    query, query_kind = decoder.spe_tokens(rows, 1)
    query = query.to(candidates.dtype)
    if previous_words is None:
        new, kinds, new_positions, commit = query, query_kind, positions[:, None], 0
    else:
        text_kind = torch.full_like(query_kind, int(Modality.TEXT))
        new, kinds = torch.cat([previous_words[:, None], query], 1), torch.cat([text_kind, query_kind], 1)
        new_positions, commit = torch.stack([positions - 1, positions], dim=1), 1
    # No mask given: after a cache the new tokens attend causally (the word does not see the query).
    # Attributes of the new tokens only (the cached ones already went through): word and query are both
    # in the causal caption span, as in `caption_logits`.
    attributes = decoder_attributes(decoder, kinds, IMAGE_TEXT_INPUT, causal=True)
    out = decoder(new, kinds, new_positions, cache=cache, use_cache=True, commit=commit, attributes=attributes)
    logits = readout.similarity(readout(out.hidden_states[:, -1]), candidates, "caption")
    return logits, out.cache


@torch.no_grad()
def incremental_logits(model, images: Tensor, word_indices: Tensor,
                       prompts: Sequence[str] | None = None) -> Tensor:
    """The step-by-step path with forced words: (B, L, V) logits of position j given words < j, as
    `caption_logits` computes them in one parallel pass."""
    state = start(model, images, prompts)
    vocab_features, candidates = model.vocabulary_features(), model.encode_words()
    cache, logits = state.cache, []
    for j in range(word_indices.shape[1]):
        previous = None if j == 0 else vocab_features[word_indices[:, j - 1]]
        step_logits, cache = step(model, cache, state.first_position + j, previous, candidates)
        logits.append(step_logits)
    return torch.stack(logits, dim=1)


@torch.no_grad()
def search(model, images: Tensor, beams: int = 1, max_length: int = 20,
           prompts: Sequence[str] | None = None) -> SearchResult:
    """Beam search over the caption vocabulary (greedy with beams=1), no length penalty: the result
    maximises the total log-probability among the sequences the beams kept."""
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    state = start(model, images, prompts)
    batch, prefix_length = state.cache.batch_size, state.cache.length
    if prefix_length + max_length > model.decoder.config.max_positions:
        raise ValueError(f"max_length {max_length} + {prefix_length} prefix tokens exceeds the decoder's "
                         f"{model.decoder.config.max_positions} positions")
    device = state.first_position.device
    vocab_features = model.vocabulary_features()            # (V, width): what a chosen word feeds back
    candidates = model.encode_words()                       # (V, D): what a query is ranked against
    eos_index = model.caption_vocab.tolist().index(model.end_token_id)

    rows = batch * beams
    expand = torch.arange(batch, device=device).repeat_interleave(beams)
    cache, first_position = state.cache.reorder(expand), state.first_position[expand]
    score_dtype = torch.promote_types(candidates.dtype, torch.float32)
    scores = torch.full((batch, beams), float("-inf"), dtype=score_dtype, device=device)
    scores[:, 0] = 0.0                                      # all beams start as copies: keep one
    sequences = torch.zeros(rows, 0, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)

    for j in range(max_length):
        previous = None if j == 0 else vocab_features[sequences[:, -1]]
        logits, cache = step(model, cache, first_position + j, previous, candidates)
        log_probs = logits.to(score_dtype).log_softmax(dim=-1)
        # A finished beam only continues with end-of-sequence, at no cost, so its score stays put.
        log_probs[finished] = float("-inf")
        log_probs[finished, eos_index] = 0.0
        vocab = log_probs.shape[-1]
        total = (scores.reshape(rows, 1) + log_probs).reshape(batch, beams * vocab)
        scores, flat = total.topk(beams, dim=-1)
        origin = (torch.arange(batch, device=device)[:, None] * beams + flat // vocab).reshape(-1)
        chosen = (flat % vocab).reshape(-1)
        sequences = torch.cat([sequences[origin], chosen[:, None]], dim=1)
        finished = finished[origin] | (chosen == eos_index)
        cache = cache.reorder(origin)
        if bool(finished.all()):
            break

    best = scores.argmax(dim=-1)
    rows_best = best + torch.arange(batch, device=device) * beams
    return SearchResult(sequences[rows_best], scores.gather(1, best[:, None])[:, 0])


def decode(model, word_indices: Tensor) -> list[str]:
    """Indices into `model.caption_vocab` (B, T) -> strings, cut at the first end-of-sequence."""
    eos_index = model.caption_vocab.tolist().index(model.end_token_id)
    vocab_ids = model.caption_vocab.cpu()
    texts = []
    for row in word_indices.tolist():
        words = row[: row.index(eos_index)] if eos_index in row else row
        texts.append(model.tokenizer.decode(vocab_ids[words].tolist(), skip_special_tokens=True).strip())
    return texts

