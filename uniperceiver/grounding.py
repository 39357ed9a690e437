"""Phrase grounding: a question's tokens read where the picture's objects are before the decoder sees them.

Each text token attends over the picture's context regions (a query-key product, one head) and gets the
encoding of the attended boxes added to it, so that the token of "star" in "where is the red star relative to
the blue square?" carries the star's place, and the query compares two places that sit on two known words
instead of finding both objects and comparing them within the decoder's few layers. Without it, position
questions stayed at chance in every probe of the tiny model; with it (and the VQA task's `answer_margin`), VQA
trained on relation questions learns them, though not within the few VQA steps of the tiny recipe's main job
(docs/shapes-world.md).

The attention is supervised where the data says which object a phrase names (the shapes data does, as
MDETR's token-region alignment used Flickr30k Entities); without such labels it trains only through the task's
loss. The box projection starts at zero, so a trained model given this layer answers as before.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .region_proposals import box_encoding


class QuestionGrounding(NamedTuple):
    """What `UniPerceiver.vqa_query_and_grounding` returns beside the queries: logits (Q, L, K) of each question
    token over its picture's context regions, and those regions' boxes (Q, K, 4) xyxy and valid (Q, K)."""
    logits: Tensor
    boxes: Tensor
    valid: Tensor


class PhraseGrounding(nn.Module):
    """text (Q, L, width), regions (Q, K, width), boxes (Q, K, 4) xyxy in input pixels, region_valid (Q, K)
    -> the text with each token's attended box encoding added, and the attention logits (Q, L, K)."""

    def __init__(self, width: int, box_frequencies: int, dim: int = 32):
        super().__init__()
        self.query = nn.Linear(width, dim)
        self.key = nn.Linear(width, dim)
        self.box = nn.Linear(8 * box_frequencies, width)
        nn.init.zeros_(self.box.weight)
        nn.init.zeros_(self.box.bias)
        self.box_frequencies, self.dim = box_frequencies, dim

    def forward(self, text: Tensor, regions: Tensor, boxes: Tensor, region_valid: Tensor,
                image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        logits = self.query(text) @ self.key(regions).transpose(1, 2) / math.sqrt(self.dim)
        # padding regions take no attention; a picture with none at all attends evenly (no NaN)
        logits = logits.float().masked_fill(~region_valid[:, None, :], torch.finfo(torch.float32).min / 2)
        weights = logits.softmax(-1).to(text.dtype)
        encoded = box_encoding(boxes.to(text.dtype), image_size, self.box_frequencies)
        return text + self.box(weights @ encoded), logits
