"""Phrase grounding: a question's tokens read where the picture's objects are before the decoder sees them.

Each text token attends over the picture's context regions (a query-key product, one head) and gets the
encoding of the attended boxes added to it, so that the token of "star" in "where is the red star relative to
the blue square?" carries the star's place, and the query compares two places that sit on two known words
instead of finding both objects and comparing them within the decoder's few layers. Without it, position
questions stayed at chance in every probe of the tiny model; with it (and the VQA task's `answer_margin`), VQA
trained on relation questions learns them, though not within the few VQA steps of the tiny recipe's main job
(docs/shapes-world.md).

Three options add to what a word takes in: the attended regions' tokens (`content`: what the object looks like,
so "what colour is the star?" reads the star's colour off the word "star"), the offset of its object from the
object an earlier word grounds in (`relations`, `PhraseRelations`: "left of" becomes the sign of one number), and
how many regions it names (`counts`, `PhraseCounts`: "how many red shapes?" reads a number off "shapes").

Beside the regions each token can attend to a learned "no object" slot, which adds a learned vector instead of a
box: "is there a red star?" of a picture without one should find nothing, and say so on the word itself.

The attention is supervised where the data says which object a phrase names, or that it names none (the shapes
data does, as MDETR's token-region alignment used Flickr30k Entities); without such labels it trains only
through the task's loss. The box projection, the slot's vector and both options' outputs start at zero, so a
trained model given this layer answers as before.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .region_proposals import box_encoding, box_places


class QuestionGrounding(NamedTuple):
    """What `UniPerceiver.vqa_query_and_grounding` returns beside the queries: logits (Q, L, K + 1) of each
    question token over its picture's K context regions and, last, the "no object" slot; the regions' boxes
    (Q, K, 4) xyxy and valid (Q, K); and the question tokens' character offsets (Q, L, 2), from the tokenizer
    call the model encoded them with (what `tasks.grounding.phrase_targets` places phrases by); with
    `detection.ground_relations`, the pairing logits (Q, L, L + 1) of each token over the earlier ones and a
    "none" slot (`PhraseRelations`), else None; with `detection.ground_counts`, the match logits (Q, L, K) of each
    token with each region (`PhraseCounts`), else None."""
    logits: Tensor
    boxes: Tensor
    valid: Tensor
    offsets: Tensor
    pairs: Tensor | None = None
    counts: Tensor | None = None


class GroundedText(NamedTuple):
    """What `PhraseGrounding` returns: the text with what each token found added, the attention logits
    (Q, L, K + 1), the slot last, and the options' logits (`PhraseRelations`' pairing, `PhraseCounts`' matches),
    None where the option is off."""
    text: Tensor
    logits: Tensor
    pairs: Tensor | None = None
    counts: Tensor | None = None


class PhraseGrounding(nn.Module):
    """text (Q, L, width), regions (Q, K, width), boxes (Q, K, 4) xyxy in input pixels, region_valid (Q, K)
    -> `GroundedText`: the text with each token's attended box encoding (and "no object" vector) added, the
    attention logits (Q, L, K + 1), the slot last, with `relations` the pairing logits of `PhraseRelations` and
    with `counts` the match logits of `PhraseCounts` (else None). `relation_words`: see `PhraseRelations`."""

    def __init__(self, width: int, box_frequencies: int, dim: int = 32, content: bool = False,
                 relations: bool = False, relation_words: bool = False, counts: bool = False,
                 max_count: int = 4):
        super().__init__()
        # content: the attended regions' tokens are added too (through a projection that starts at zero)
        self.content = nn.Linear(width, width) if content else None
        if self.content is not None:
            nn.init.zeros_(self.content.weight)
            nn.init.zeros_(self.content.bias)
        self.relations = PhraseRelations(width, dim, words=relation_words) if relations else None
        self.counts = PhraseCounts(width, dim, max_count) if counts else None
        self.query = nn.Linear(width, dim)
        self.key = nn.Linear(width, dim)
        self.box = nn.Linear(8 * box_frequencies, width)
        nn.init.zeros_(self.box.weight)
        nn.init.zeros_(self.box.bias)
        self.null_key = nn.Parameter(torch.zeros(dim))
        self.null_value = nn.Parameter(torch.zeros(width))
        self.box_frequencies, self.dim = box_frequencies, dim

    def forward(self, text: Tensor, regions: Tensor, boxes: Tensor, region_valid: Tensor,
                image_size: tuple[int, int], text_valid: Tensor | None = None) -> GroundedText:
        query = self.query(text)
        keys = torch.cat([self.key(regions), self.null_key.to(regions.dtype).expand(regions.shape[0], 1, -1)], 1)
        logits = query @ keys.transpose(1, 2) / math.sqrt(self.dim)
        valid = torch.cat([region_valid, region_valid.new_ones(region_valid.shape[0], 1)], 1)
        # padding regions take no attention (the slot always can: no NaN when a picture has no region)
        logits = logits.float().masked_fill(~valid[:, None, :], torch.finfo(torch.float32).min / 2)
        probabilities = logits.softmax(-1)  # float32; the relations read it as it is
        weights = probabilities.to(text.dtype)
        # in float32: the high bands of the encoding are noise in bf16, and places are what this layer carries
        encoded = box_encoding(boxes.float(), image_size, self.box_frequencies).to(text.dtype)
        found = self.box(weights[..., :-1] @ encoded) + weights[..., -1:] * self.null_value.to(text.dtype)
        if self.content is not None:
            found = found + self.content(weights[..., :-1] @ regions)
        pair_logits = None
        if self.relations is not None:
            if text_valid is None:
                text_valid = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            relative, pair_logits = self.relations(text, text_valid, probabilities[..., :-1],
                                                   box_places(boxes.float(), image_size))
            found = found + relative.to(text.dtype)
        count_logits = None
        if self.counts is not None:
            counted, count_logits = self.counts(text, regions, region_valid)
            found = found + counted.to(text.dtype)
        return GroundedText(text + found, logits, pair_logits, count_logits)


class PhraseRelations(nn.Module):
    """Where a token's object lies relative to an earlier token's: each token attends over the earlier tokens of
    its question (or a "none" slot, last), and takes in the offset between the places the two attend to in the
    picture, through a small MLP whose output starts at zero.

    Why: with places alone on the words, "is the red star left of the blue square?" needs the decoder to find
    both words and compare two sine-cosine encodings, which the tiny model learned only with ten times the
    relation questions of the main job (docs/shapes-world.md). The offset makes the comparison the sign of one
    number on the second phrase's word. Which earlier token is the partner is learned: supervised, where the
    data names two objects, by the earlier phrase's last token (`tasks.grounding.pair_targets`).

    `words`: each token also reads `directions` directions off its own state (Linear(width, 2) each) and takes in
    the offset's projection on them. A token of "the blue square" in "is the red star left of the blue square?"
    has read "left of" (or, without a causal text model, can see it), so one of its directions can be "left",
    and the yes or no becomes the sign of one product. Without it the decoder has to cross the relation word
    with the offset's sign itself (an exclusive or), which the main job's VQA steps left at chance
    (docs/shapes-world.md).

    text (Q, L, width), text_valid (Q, L), attention (Q, L, K) of each token over the regions (the grounding's
    weights, without the slot), places (Q, K, 4) of the regions (`box_places`) -> (Q, L, width) to add to the
    text, and the pairing logits (Q, L, L + 1)."""

    features = 5  # dx, dy, log width ratio, log height ratio, and how much both tokens attend to regions at all
    directions = 4  # with `words`: the offset's projections on directions read off the token

    def __init__(self, width: int, dim: int = 32, words: bool = False):
        super().__init__()
        self.query = nn.Linear(width, dim)
        self.key = nn.Linear(width, dim)
        self.null_key = nn.Parameter(torch.zeros(dim))
        self.direction = nn.Linear(width, 2 * self.directions) if words else None
        self.hidden = nn.Linear(self.features + (self.directions if words else 0), width)
        self.out = nn.Linear(width, width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.dim = dim

    def forward(self, text: Tensor, text_valid: Tensor, attention: Tensor, places: Tensor) -> tuple[Tensor, Tensor]:
        length = text.shape[1]
        keys = torch.cat([self.key(text), self.null_key.to(text.dtype).expand(text.shape[0], 1, -1)], 1)
        logits = (self.query(text) @ keys.transpose(1, 2)).float() / math.sqrt(self.dim)
        earlier = torch.ones(length, length, dtype=torch.bool, device=text.device).tril(-1)
        allowed = torch.cat([earlier[None] & text_valid[:, None, :],
                             text_valid.new_ones(text.shape[0], length, 1)], -1)
        logits = logits.masked_fill(~allowed, torch.finfo(torch.float32).min / 2)
        pairing = logits.softmax(-1)[..., :-1]  # (Q, L, L); the slot's share pairs with nothing
        attention = attention.float()
        mass = attention.sum(-1, keepdim=True)  # (Q, L, 1)
        place = (attention @ places) / mass.clamp_min(1e-6)  # each token's attended place, (Q, L, 4)
        centre, size = place[..., :2], place[..., 2:].clamp_min(1e-3).log()
        # token i against token j, weighted by how much both look at regions at all (Q, L, L, 5)
        pair = torch.cat([4 * (centre[:, :, None] - centre[:, None]), size[:, :, None] - size[:, None],
                          torch.ones_like(centre[:, :, None, :1].expand(-1, -1, length, -1))], -1)
        pair = pair * (mass[:, :, None] * mass[:, None]).clamp(0, 1)
        relative = (pairing[..., None] * pair).sum(2)
        if self.direction is not None:  # (Q, L, directions): the paired offset's projection on each direction
            directions = self.direction(text).float().unflatten(-1, (self.directions, 2))
            relative = torch.cat([relative, (directions * relative[..., None, :2]).sum(-1)], -1)
        return self.out(F.gelu(self.hidden(relative.to(self.hidden.weight.dtype)))), logits


class PhraseCounts(nn.Module):
    """How many of the picture's context regions a token names: each token matches each region on its own (a
    sigmoid of a query-key product, not the grounding's softmax, which picks one), and takes in the sum of the
    matches through a small layer whose output starts at zero.

    Why: "how many red shapes?" names several objects or none, which the grounding's softmax over one region
    or the "no object" slot cannot say, and the decoder's few layers did not learn to count a subset from the
    image tokens: such questions were answered "one" almost always (docs/shapes-world.md). The matches are
    supervised where the data says which objects a counting phrase names (`tasks.grounding.count_targets`).

    text (Q, L, width), regions (Q, K, width), region_valid (Q, K) -> (Q, L, width) to add to the text, and the
    match logits (Q, L, K), padding regions at float32's min / 2."""

    def __init__(self, width: int, dim: int = 32, max_count: int = 4):
        super().__init__()
        self.query = nn.Linear(width, dim)
        self.key = nn.Linear(width, dim)
        # matches start mostly off (most tokens count nothing); one element, not a 0-d tensor, which DeepSpeed's
        # flattening of the parameters cannot view
        self.bias = nn.Parameter(torch.full((1,), -2.0))
        # the count as a soft one-hot over 0..max_count (each number's hat), so that "two" and "three" need
        # not lie on one line in the decoder's width
        self.value = nn.Linear(max_count + 1, width)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)
        self.register_buffer("numbers", torch.arange(max_count + 1, dtype=torch.float), persistent=False)
        self.dim = dim

    def forward(self, text: Tensor, regions: Tensor, region_valid: Tensor) -> tuple[Tensor, Tensor]:
        logits = (self.query(text) @ self.key(regions).transpose(1, 2)).float() / math.sqrt(self.dim) + self.bias
        logits = logits.masked_fill(~region_valid[:, None, :], torch.finfo(torch.float32).min / 2)
        count = logits.sigmoid().sum(-1, keepdim=True)  # (Q, L, 1); padding adds 0
        hats = (1 - (count - self.numbers).abs()).clamp_min(0)  # the count past max_count adds nothing
        return self.value(hats.to(self.value.weight.dtype)), logits
