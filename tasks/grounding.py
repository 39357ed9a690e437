"""Supervision for the phrase-grounding layer (`uniperceiver.grounding`): which context region each grounded
phrase of a question means. A phrase comes from the data as [start, end, box] (characters of the question, and
the box of the one object it names, or None when it names none in the picture); its last token (which, in a
causal language model, has read the whole phrase) is taught to attend to the context region that overlaps that
box best, when the overlap reaches `min_iou`, or to the layer's "no object" slot. Phrases whose object no context
region found are left out.

Counting phrases ("red shapes" in "how many red shapes are there?") come as [start, end, [boxes]], every object
they name; their last token is taught to match, each on its own, the context regions that found those objects,
and no other (`count_targets`, for `uniperceiver.grounding.PhraseCounts`)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

IGNORE = -100


def input_boxes(image: Any, boxes: Sequence[Sequence[float]], size: int) -> list[list[float]]:
    """COCO [x, y, w, h] boxes in a picture's own pixels -> xyxy in the model's input pixels, as `stack_images`
    prepares it: a PIL picture is resized so that its shorter side is `size`, then centre-cropped (boxes are
    clipped to the crop); a tensor is taken as already at the input size."""
    if isinstance(image, Tensor):
        scale, left, top, limit_w, limit_h = 1.0, 0.0, 0.0, image.shape[-1], image.shape[-2]
    else:
        width, height = image.size
        scale = size / min(width, height)
        # torchvision's Resize rounds the longer side down; CenterCrop's offsets round to the nearest pixel
        if width <= height:
            resized_w, resized_h = size, int(size * height / width)
        else:
            resized_w, resized_h = int(size * width / height), size
        left, top = int(round((resized_w - size) / 2.0)), int(round((resized_h - size) / 2.0))
        limit_w = limit_h = size
    out = []
    for x, y, w, h in boxes:
        x0, y0, x1, y1 = x * scale - left, y * scale - top, (x + w) * scale - left, (y + h) * scale - top
        out.append([min(max(x0, 0.0), limit_w), min(max(y0, 0.0), limit_h),
                    min(max(x1, 0.0), limit_w), min(max(y1, 0.0), limit_h)])
    return out


def phrase_targets(offsets: Tensor, groundings: Sequence[Sequence[tuple[int, int, Sequence[float] | None]]],
                   region_boxes: Tensor, region_valid: Tensor, min_iou: float = 0.5) -> Tensor:
    """(Q, L) the context region each question token should attend to (K: the "no object" slot), IGNORE
    elsewhere. offsets (Q, L, 2): the tokens' characters (`QuestionGrounding.offsets`); groundings: per question,
    (start, end, xyxy box or None) phrases; region_boxes (Q, K, 4), region_valid (Q, K): the questions' context
    regions. All phrases of the batch at once: a step of 16 pictures has about 150."""
    if len(groundings) != offsets.shape[0]:
        raise ValueError(f"phrase_targets: {len(groundings)} questions' groundings for {offsets.shape[0]} questions")
    targets = torch.full(offsets.shape[:2], IGNORE, dtype=torch.long)
    phrases = [(q, start, end, box) for q, question in enumerate(groundings) for start, end, box in question]
    if not phrases:
        return targets
    slot = region_boxes.shape[1]
    question = torch.tensor([q for q, *_ in phrases])
    last, found = _last_tokens(offsets, question, torch.tensor([[start, end] for _, start, end, _ in phrases]))
    named = torch.tensor([box is not None for *_, box in phrases])
    boxes = torch.tensor([list(box) if box is not None else [0.0] * 4 for *_, box in phrases], dtype=torch.float)
    regions = region_boxes.detach().float().cpu()[question]  # (P, K, 4)
    overlap = box_iou(regions.flatten(0, 1), boxes).view(len(phrases), slot, len(phrases))
    overlap = overlap.diagonal(dim1=0, dim2=2).T  # (P, K): each phrase against its own question's regions
    overlap = torch.nan_to_num(overlap, nan=0.0).masked_fill(~region_valid.cpu()[question], 0.0)
    best, region = overlap.max(1)
    target = torch.where(named, region, torch.full_like(region, slot))
    keep = found & (~named | (best >= min_iou))
    targets[question[keep], last[keep]] = target[keep]
    return targets


def _last_tokens(offsets: Tensor, question: Tensor, spans: Tensor) -> tuple[Tensor, Tensor]:
    """Each phrase's last token (the highest position covering its characters) and whether it has one (a phrase
    truncated away has none): offsets (Q, L, 2), question (P,), spans (P, 2) -> (P,), (P,)."""
    starts, ends = offsets[question, :, 0], offsets[question, :, 1]  # (P, L)
    covering = (starts < spans[:, 1:]) & (ends > spans[:, :1]) & (ends > starts)
    return (covering * torch.arange(1, covering.shape[1] + 1)).argmax(1), covering.any(1)


def count_targets(offsets: Tensor, counted: Sequence[Sequence[tuple[int, int, Sequence[Sequence[float]]]]],
                  region_boxes: Tensor, region_valid: Tensor, min_iou: float = 0.5) -> Tensor:
    """(Q, L, K) whether each counting phrase's last token should match each context region: 1 for a region that
    overlaps one of the phrase's objects best (IoU >= `min_iou`; each object claims one region), 0 for every other
    valid region, -1 (ignored) for padding regions and every other token. counted: per question, (start, end,
    [xyxy boxes of the objects it names]) phrases; offsets, region_boxes, region_valid as `phrase_targets`."""
    if len(counted) != offsets.shape[0]:
        raise ValueError(f"count_targets: {len(counted)} questions' counting phrases for {offsets.shape[0]} questions")
    slots = region_boxes.shape[1]
    targets = torch.full((*offsets.shape[:2], slots), -1.0)
    phrases = [(q, start, end, boxes) for q, question in enumerate(counted) for start, end, boxes in question]
    if not phrases:
        return targets
    question = torch.tensor([q for q, *_ in phrases])
    last, found = _last_tokens(offsets, question, torch.tensor([[start, end] for _, start, end, _ in phrases]))
    regions, valid = region_boxes.detach().float().cpu(), region_valid.cpu()
    for p, (q, _, _, boxes) in enumerate(phrases):
        if not found[p]:
            continue
        row = torch.where(valid[q], 0.0, -1.0)  # padding regions ignored, every valid one 0 until claimed
        if len(boxes):
            overlap = torch.nan_to_num(box_iou(torch.tensor(boxes, dtype=torch.float).view(-1, 4), regions[q]))
            best, region = overlap.masked_fill(~valid[q], 0.0).max(1)
            row[region[best >= min_iou]] = 1.0
        targets[q, last[p]] = row
    return targets


def count_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of the counting phrases' matches with the context regions (`count_targets`); 0 (with
    a graph) when no phrase is counted."""
    targets = targets.to(logits.device)
    scored = targets >= 0
    if not bool(scored.any()):
        return (logits * 0.0).sum()  # zeroed first: padding logits (float32 min / 2) would sum to -inf
    return F.binary_cross_entropy_with_logits(logits.float()[scored], targets[scored])


def pair_targets(region_targets: Tensor, regions: int) -> Tensor:
    """(Q, L) which earlier token each phrase token should pair with (`uniperceiver.grounding.PhraseRelations`),
    from `phrase_targets` over `regions` context regions: a question's first phrase that names a found object
    pairs with nothing (index L, the "none" slot), each later one with the phrase before it; IGNORE elsewhere."""
    targets = torch.full_like(region_targets, IGNORE)
    length = region_targets.shape[1]
    for q, positions in enumerate((region_targets >= 0) & (region_targets < regions)):
        tokens = positions.nonzero(as_tuple=True)[0].tolist()
        for previous, token in zip([length] + tokens, tokens):
            targets[q, token] = previous
    return targets


def grounding_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the grounded tokens' attention over the regions (or of their pairing over the earlier
    tokens); 0 (with a graph) when none is grounded."""
    targets = targets.to(logits.device)
    if not bool((targets != IGNORE).any()):
        # zeroed before the sum: masked logits (float32 min / 2) would add up to -inf, and -inf * 0 is NaN
        return (logits * 0.0).sum()
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
