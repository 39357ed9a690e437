"""Phrase grounding: a question's tokens read where the picture's objects are before the decoder sees them.

Each text token attends over the picture's context regions (a query-key product, one head) and gets the
encoding of the attended boxes added to it, so that the token of "star" in "where is the red star relative to
the blue square?" carries the star's place, and the query compares two places that sit on two known words
instead of finding both objects and comparing them within the decoder's few layers. Without it, position
questions stayed at chance in every probe of the tiny model; with it (and the VQA task's `answer_margin`), VQA
trained on relation questions learns them, though not within the few VQA steps of the tiny recipe's main job
(docs/shapes-world.md).

Beside the regions each token can attend to a learned "no object" slot, which adds a learned vector instead of a
box: "is there a red star?" of a picture without one should find nothing, and say so on the word itself.

The attention is supervised where the data says which object a phrase names, or that it names none (the shapes
data does, as MDETR's token-region alignment used Flickr30k Entities); without such labels it trains only
through the task's loss. The box projection and the slot's vector start at zero, so a trained model given this
layer answers as before.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .region_proposals import box_encoding


class QuestionGrounding(NamedTuple):
    """What `UniPerceiver.vqa_query_and_grounding` returns beside the queries: logits (Q, L, K + 1) of each
    question token over its picture's K context regions and, last, the "no object" slot; the regions' boxes
    (Q, K, 4) xyxy and valid (Q, K)."""
    logits: Tensor
    boxes: Tensor
    valid: Tensor


class PhraseGrounding(nn.Module):
    """text (Q, L, width), regions (Q, K, width), boxes (Q, K, 4) xyxy in input pixels, region_valid (Q, K)
    -> the text with each token's attended box encoding (and "no object" vector) added, and the attention
    logits (Q, L, K + 1), the slot last."""

    def __init__(self, width: int, box_frequencies: int, dim: int = 32):
        super().__init__()
        self.query = nn.Linear(width, dim)
        self.key = nn.Linear(width, dim)
        self.box = nn.Linear(8 * box_frequencies, width)
        nn.init.zeros_(self.box.weight)
        nn.init.zeros_(self.box.bias)
        self.null_key = nn.Parameter(torch.zeros(dim))
        self.null_value = nn.Parameter(torch.zeros(width))
        self.box_frequencies, self.dim = box_frequencies, dim

    def forward(self, text: Tensor, regions: Tensor, boxes: Tensor, region_valid: Tensor,
                image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        query = self.query(text)
        keys = torch.cat([self.key(regions), self.null_key.to(regions.dtype).expand(regions.shape[0], 1, -1)], 1)
        logits = query @ keys.transpose(1, 2) / math.sqrt(self.dim)
        valid = torch.cat([region_valid, region_valid.new_ones(region_valid.shape[0], 1)], 1)
        # padding regions take no attention (the slot always can: no NaN when a picture has no region)
        logits = logits.float().masked_fill(~valid[:, None, :], torch.finfo(torch.float32).min / 2)
        weights = logits.softmax(-1).to(text.dtype)
        # in float32: the high bands of the encoding are noise in bf16, and places are what this layer carries
        encoded = box_encoding(boxes.float(), image_size, self.box_frequencies).to(text.dtype)
        found = self.box(weights[..., :-1] @ encoded) + weights[..., -1:] * self.null_value.to(text.dtype)
        return text + found, logits
