"""Caption decoding: beam search (greedy with one beam) over the caption vocabulary, using the decoder's
key/value cache so each step runs two new tokens instead of the whole sequence.

Step j feeds [w_{j-1}, q_j] after the cache of [SPE, image tokens, w_<j-1]: the word is committed to the
cache, the query is not, which reproduces the training mask (query j sees the image, the words before j
and itself).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .decoder import Modality


@torch.no_grad()
def beam_search(model, images: Tensor, beams: int = 1, max_length: int = 20) -> list[str]:
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    decoder, readout = model.decoder, model.readout
    prefix, kinds = model.caption_prefix(images)
    tokens, kinds = decoder.prepend_spe(prefix, kinds)
    batch, prefix_length = tokens.shape[:2]
    if prefix_length + max_length > decoder.config.max_positions:
        raise ValueError(f"max_length {max_length} + {prefix_length} prefix tokens exceeds the decoder's "
                         f"{decoder.config.max_positions} positions")
    device = tokens.device
    cache = decoder(tokens, kinds, use_cache=True).cache
    vocab_features = model.vocabulary_features()           # (V, width): what a chosen word feeds back
    candidates = model.encode_words()                       # (V, D): what a query is ranked against
    eos_index = model.caption_vocab.tolist().index(model.tokenizer.eos_token_id)

    rows = batch * beams
    cache = cache.reorder(torch.arange(batch, device=device).repeat_interleave(beams))
    scores = torch.full((batch, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0                                      # all beams start as copies: keep one
    sequences = torch.zeros(rows, 0, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    query, query_kind = decoder.spe_tokens(rows, 1)
    text_kind = torch.full((rows, 1), int(Modality.TEXT), dtype=torch.long, device=device)

    for step in range(max_length):
        position = prefix_length + step
        if step == 0:
            new, new_kinds, commit = query, query_kind, 0
            positions = torch.full((rows, 1), position, device=device)
        else:
            word = vocab_features[sequences[:, -1]][:, None]
            new, new_kinds, commit = torch.cat([word, query], 1), torch.cat([text_kind, query_kind], 1), 1
            positions = torch.tensor([position - 1, position], device=device).expand(rows, -1)
        out = decoder(new, new_kinds, positions, cache=cache, use_cache=True, commit=commit)
        logits = readout.similarity(readout(out.hidden_states[:, -1]), candidates, "caption")
        log_probs = logits.float().log_softmax(dim=-1)
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
        cache = out.cache.reorder(origin)
        if bool(finished.all()):
            break

    best = scores.argmax(dim=-1) + torch.arange(batch, device=device) * beams
    vocab_ids = model.caption_vocab
    captions = []
    for row in sequences[best].tolist():
        words = row[: row.index(eos_index)] if eos_index in row else row
        captions.append(model.tokenizer.decode(vocab_ids[words].tolist(), skip_special_tokens=True).strip())
    return captions
