"""Which TokenAttribute codes (see `moe.TokenAttribute`) each sequence of the model routes by.

A token's code is the OR of three parts:
- task-level bits, the same for every token of a sequence: INPUT_IMAGE / INPUT_TEXT / TARGET_TEXT;
- token-level bits from the modality id: TOKEN_VISUAL for IMAGE_GLOBAL / IMAGE_PATCH / REGION, TOKEN_TEXT
  for TEXT, neither for SPE (the leading <SPE> and the <SPE> queries);
- TARGET_SIDE for every token of a candidate-target sequence, CAUSAL_TEXT for caption words and their
  <SPE> queries (the causally masked span).

The roles of the model's paths:

=========================  ======================================  ===========  ====================================
path                       task bits                               target side  causal span
=========================  ======================================  ===========  ====================================
encode_image               INPUT_IMAGE | TARGET_TEXT               no           none
encode_text                INPUT_IMAGE | TARGET_TEXT               yes          none
encode_words               INPUT_IMAGE | INPUT_TEXT | TARGET_TEXT  yes          none
vqa_query                  INPUT_IMAGE | INPUT_TEXT | TARGET_TEXT  no           none
caption_logits, caption,   INPUT_IMAGE | INPUT_TEXT | TARGET_TEXT  no           words and their <SPE> queries
generation.start / step                                                         (the prefix, prompt included, not)
region_embeddings          INPUT_IMAGE | INPUT_REGIONS             no           none
                           | TARGET_TEXT
=========================  ======================================  ===========  ====================================

Why these:
- encode_image is the input of the image -> text tasks (classification, image-to-text retrieval).
- encode_text is a candidate text of an image task: class names, VQA answers, retrieval captions. It has one
  role, whichever task calls it, because a text's embedding must not depend on its caller: class embeddings
  are precomputed once, the retrieval loss uses the same text embeddings for both directions (text-to-image
  ranks images against the very vectors image-to-text ranks as candidates), and the VQA answer list is
  encoded like any other candidate text. So VQA answers do not carry INPUT_TEXT, unlike the VQA query.
- Detection's input is the image and its region tokens (REGION modality, so TOKEN_VISUAL); its candidates
  are category names, encoded by encode_text like class names (TARGET_TEXT).
- Captioning's input is the image and the words so far, so captioning and (open-ended or ranked) VQA share
  the task bits INPUT_IMAGE | INPUT_TEXT | TARGET_TEXT; encode_words (the caption vocabulary, what the
  queries of both are ranked against) takes the same task bits on the target side. Caption words and their
  queries add CAUSAL_TEXT, which separates them from a VQA question (bidirectional text of the prefix).

The codes are only computed when the decoder has MoE layers (`decoder_attributes` returns None otherwise),
so the dense model runs exactly as before.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .decoder import Modality
from .moe import TokenAttribute as A

VISUAL_MODALITIES = (Modality.IMAGE_GLOBAL, Modality.IMAGE_PATCH, Modality.REGION)


class SequenceRole(NamedTuple):
    """What a sequence is in its task: the task-level bits and whether it is a candidate target."""
    task: A
    target_side: bool = False


IMAGE_INPUT = SequenceRole(A.INPUT_IMAGE | A.TARGET_TEXT)                                 # encode_image
TEXT_CANDIDATE = SequenceRole(A.INPUT_IMAGE | A.TARGET_TEXT, target_side=True)           # encode_text
WORD_CANDIDATE = SequenceRole(A.INPUT_IMAGE | A.INPUT_TEXT | A.TARGET_TEXT, target_side=True)  # encode_words
IMAGE_TEXT_INPUT = SequenceRole(A.INPUT_IMAGE | A.INPUT_TEXT | A.TARGET_TEXT)            # vqa_query, captioning
REGION_INPUT = SequenceRole(A.INPUT_IMAGE | A.INPUT_REGIONS | A.TARGET_TEXT)            # region_embeddings


def token_attributes(modality_ids: Tensor, role: SequenceRole, causal: Tensor | bool = False) -> Tensor:
    """(B, L) modality ids -> (B, L) int64 attribute codes for a sequence of this `role`.

    causal: True, or a boolean mask broadcastable to (B, L), for the tokens in the causal caption span.
    """
    ids = modality_ids.long()
    codes = torch.full_like(ids, int(role.task))
    visual = torch.isin(ids, torch.tensor([int(m) for m in VISUAL_MODALITIES], device=ids.device))
    codes = codes | torch.where(visual, int(A.TOKEN_VISUAL), 0)
    codes = codes | torch.where(ids == int(Modality.TEXT), int(A.TOKEN_TEXT), 0)
    if role.target_side:
        codes = codes | int(A.TARGET_SIDE)
    causal = torch.as_tensor(causal, dtype=torch.bool, device=ids.device)
    return codes | torch.where(causal, int(A.CAUSAL_TEXT), 0)


def decoder_attributes(decoder, modality_ids: Tensor, role: SequenceRole,
                       causal: Tensor | bool = False) -> Tensor | None:
    """`token_attributes` for `decoder`, or None when it has no MoE layer (the dense path takes none)."""
    if decoder.config.moe_experts <= 0:
        return None
    return token_attributes(modality_ids, role, causal)


def caption_causal_span(layout, device: torch.device | str | None = None) -> Tensor:
    """(L,) booleans of a `CaptionLayout`: True for the words and their <SPE> queries."""
    span = torch.zeros(layout.length, dtype=torch.bool, device=device)
    span[layout.num_prefix:] = True
    return span
