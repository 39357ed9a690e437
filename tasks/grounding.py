"""Supervision for the phrase-grounding layer (`uniperceiver.grounding`): which context region each grounded
phrase of a question means. A phrase comes from the data as [start, end, box] (characters of the question, and
the box of the one object it names, or None when it names none in the picture); its last token (which, in a
causal language model, has read the whole phrase) is taught to attend to the context region that overlaps that
box best, when the overlap reaches `min_iou`, or to the layer's "no object" slot. Phrases whose object no context
region found are left out."""
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
    spans = torch.tensor([[start, end] for _, start, end, _ in phrases])
    starts, ends = offsets[question, :, 0], offsets[question, :, 1]  # (P, L)
    covering = (starts < spans[:, 1:]) & (ends > spans[:, :1]) & (ends > starts)
    # the phrase's last token: the highest position that covers it (a phrase truncated away has none)
    last = (covering * torch.arange(1, covering.shape[1] + 1)).argmax(1)
    found = covering.any(1)
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
