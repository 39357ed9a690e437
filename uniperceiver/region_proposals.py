"""Class-agnostic region proposals on the backbone's feature pyramid, and region tokens for the shared decoder.

Localisation and recognition are decoupled, as in Uni-Perceiver v2: this module only says where objects are
(foreground or background, and a box); what each one is comes from the decoder, which reads every proposal as a
token and ranks the category names against it.

The proposal network is a dense one-to-many head in the FCOS manner, chosen because it converges on a CPU in a
few hundred steps (a DETR-style head needs far longer): at every location of every level a small conv tower
predicts objectness, centre-ness and the distances to the four sides of a box. A location is trained as
positive for a ground-truth box when it lies inside the box, within `centre_radius` strides of its centre, on the
level whose size range holds the box; the nearest location of that level is always positive, so that no box is
left without one. Proposals are the top locations by sqrt(objectness x centre-ness) after class-agnostic NMS.

A region token is the RoI-aligned feature of its box on one level (the FPN rule picks the level by box size)
plus a linear projection of a sine-cosine encoding of the box, both in the decoder's width.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, generalized_box_iou_loss, roi_align, sigmoid_focal_loss


@dataclass
class RegionConfig:
    """levels: backbone stages the proposal network reads (InternImage: 0..3 = strides 4/8/16/32; small objects
    are told apart on the stride-4 map, see docs/shapes-world.md);
    width / depth: channels and conv layers of its tower; num_proposals: regions per image kept after NMS;
    pre_nms_top_k: locations scored before NMS; nms_iou: the NMS threshold; centre_radius: in strides;
    size_per_level: level i takes boxes whose longer side lies in (size x stride_{i-1}, size x stride_i];
    roi_size: RoI-align output side; box_frequencies: sine-cosine frequencies per box coordinate;
    context_regions: how many of each image's best proposals join its image tokens in every task (0: regions are
    detection's alone). Their tokens carry the stride-4 map's view of each object, which the patch tokens
    (stride 16 and coarser) blur away: what a question about a small shape's identity or place needs;
    context_names: whether each context region also carries its detection embedding (the decoder's region
    embedding, what detection ranks the category names against; found without gradients), so that every task
    reads what detection has learned to name, as object tags in region-based vision-language models;
    ground_text: whether a question's tokens first attend over the context regions and take in their boxes
    (`uniperceiver.grounding`), which VQA can supervise with the phrases' objects: what questions on two
    objects' places need.
    ground_content: with ground_text, a token also takes in the attended regions' tokens (what is there: the RoI
    features and detection's name of the box), so "what colour is the star?" carries the star's look on the
    word "star" and the decoder reads it off the question instead of finding the star among the image tokens.
    ground_relations: with ground_text, each token also takes in where its object lies relative to an earlier
    token's (`uniperceiver.grounding.PhraseRelations`): "left of" becomes the sign of one offset.
    ground_relation_words: with ground_relations, the offset is also projected on directions each token reads off
    its own words, so "is the A left of the B?" becomes the sign of one product (`PhraseRelations`' `words`).
    ground_counts: with ground_text, each token also matches every context region on its own and takes in how
    many it matches (`uniperceiver.grounding.PhraseCounts`): what "how many red shapes?" needs."""
    levels: tuple[int, ...] = (0, 1, 2, 3)
    width: int = 64
    depth: int = 2
    num_proposals: int = 16
    pre_nms_top_k: int = 200
    nms_iou: float = 0.6
    centre_radius: float = 1.5
    size_per_level: float = 4.0
    roi_size: int = 7
    box_frequencies: int = 8
    context_regions: int = 0
    context_names: bool = False
    ground_text: bool = False
    ground_content: bool = False
    ground_relations: bool = False
    ground_relation_words: bool = False
    ground_counts: bool = False

    def __post_init__(self):
        self.levels = tuple(int(level) for level in self.levels)
        if not self.levels or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"RegionConfig.levels {list(self.levels)}: expected distinct backbone stages in "
                             "increasing order, e.g. [1, 2, 3]")
        for name in ("width", "depth", "num_proposals", "pre_nms_top_k", "roi_size", "box_frequencies"):
            if getattr(self, name) < 1:
                raise ValueError(f"RegionConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.context_regions <= self.num_proposals:
            raise ValueError(f"RegionConfig.context_regions must lie in [0, num_proposals={self.num_proposals}], "
                             f"got {self.context_regions}")
        if self.context_names and not self.context_regions:
            raise ValueError("RegionConfig.context_names needs context_regions >= 1: only context regions carry names")
        if self.ground_text and not self.context_regions:
            raise ValueError("RegionConfig.ground_text needs context_regions >= 1: the text is grounded in them")
        for name in ("ground_content", "ground_relations", "ground_counts"):
            if getattr(self, name) and not self.ground_text:
                raise ValueError(f"RegionConfig.{name} needs ground_text: true (it adds to what grounding takes in)")
        if self.ground_relation_words and not self.ground_relations:
            raise ValueError("RegionConfig.ground_relation_words needs ground_relations: true (it projects their "
                             "offsets)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DensePredictions(NamedTuple):
    """Per location, all levels concatenated: objectness and centre-ness logits (B, N), side distances in
    pixels (B, N, 4: left, top, right, bottom); and per location its centre (N, 2) in pixels, its stride (N,)
    and its level index (N,)."""
    objectness: Tensor
    centreness: Tensor
    distances: Tensor
    points: Tensor
    strides: Tensor
    level_ids: Tensor


class Proposals(NamedTuple):
    """boxes (B, K, 4) xyxy in input pixels, scores (B, K) in [0, 1], valid (B, K): False for padding."""
    boxes: Tensor
    scores: Tensor
    valid: Tensor


class ContextRegions(NamedTuple):
    """The context regions of a batch of pictures: tokens (B, K, width), as they join the image tokens; boxes
    (B, K, 4) xyxy in input pixels; valid (B, K), False for padding; image_size (height, width) of the input."""
    tokens: Tensor
    boxes: Tensor
    valid: Tensor
    image_size: tuple[int, int]


def decode_boxes(points: Tensor, distances: Tensor) -> Tensor:
    """Location centres (..., 2) and side distances (..., 4) -> xyxy boxes (..., 4)."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


class RegionProposalNetwork(nn.Module):
    """Backbone maps -> dense objectness, centre-ness and boxes; losses against ground truth; proposals."""

    def __init__(self, config: RegionConfig, channels: Sequence[int], strides: Sequence[int]):
        super().__init__()
        self.config = config
        self.strides = [int(s) for s in strides]
        width = config.width
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        tower = []
        for _ in range(config.depth):
            tower += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(min(8, width), width), nn.GELU()]
        self.tower = nn.Sequential(*tower)
        self.objectness = nn.Conv2d(width, 1, 3, padding=1)
        self.centreness = nn.Conv2d(width, 1, 3, padding=1)
        self.box = nn.Conv2d(width, 4, 3, padding=1)
        self.level_scales = nn.Parameter(torch.ones(len(channels)))  # a learnable scale per level, as FCOS
        prior = 0.01  # the focal-loss prior: objectness starts near "background" everywhere
        nn.init.constant_(self.objectness.bias, -math.log((1 - prior) / prior))

    def size_ranges(self) -> list[tuple[float, float]]:
        edges = [self.config.size_per_level * s for s in self.strides]
        lows = [0.0] + edges[:-1]
        highs = edges[:-1] + [math.inf]
        return list(zip(lows, highs))

    def forward(self, maps: Sequence[Tensor]) -> DensePredictions:
        objectness, centreness, distances, points, strides, level_ids = [], [], [], [], [], []
        for index, (lateral, feature, stride) in enumerate(zip(self.lateral, maps, self.strides)):
            x = self.tower(lateral(feature))
            batch, _, h, w = x.shape
            objectness.append(self.objectness(x).flatten(1))
            centreness.append(self.centreness(x).flatten(1))
            # distances in strides through exp (always positive), then in pixels
            raw = (self.box(x) * self.level_scales[index]).clamp(max=8.0).exp() * stride
            distances.append(raw.flatten(2).transpose(1, 2))
            ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device),
                                    indexing="ij")
            grid = torch.stack([xs, ys], dim=-1).reshape(-1, 2).to(x.dtype)
            points.append((grid + 0.5) * stride)
            strides.append(torch.full((h * w,), float(stride), device=x.device))
            level_ids.append(torch.full((h * w,), index, device=x.device, dtype=torch.long))
        return DensePredictions(torch.cat(objectness, 1), torch.cat(centreness, 1), torch.cat(distances, 1),
                                torch.cat(points), torch.cat(strides), torch.cat(level_ids))

    # --------------------------------------------------------------------------------------------- training
    def assign(self, predictions: DensePredictions, boxes: Tensor) -> Tensor:
        """Ground-truth boxes (M, 4) xyxy of one image -> (N,) the index of each location's box, -1 for
        background. Where boxes compete for a location, the smallest wins."""
        points, strides, levels = predictions.points, predictions.strides, predictions.level_ids
        count = points.shape[0]
        if boxes.numel() == 0:
            return torch.full((count,), -1, dtype=torch.long, device=points.device)
        x, y = points[:, None, 0], points[:, None, 1]
        inside = (x > boxes[:, 0]) & (x < boxes[:, 2]) & (y > boxes[:, 1]) & (y < boxes[:, 3])
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        radius = self.config.centre_radius * strides[:, None]
        near = ((x - centres[:, 0]).abs() < radius) & ((y - centres[:, 1]).abs() < radius)
        sides = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values
        ranges = torch.tensor(self.size_ranges(), device=points.device, dtype=boxes.dtype)
        box_level = ((sides[:, None] > ranges[:, 0]) & (sides[:, None] <= ranges[:, 1])).float().argmax(dim=1)
        on_level = levels[:, None] == box_level[None, :]
        candidate = inside & near & on_level
        # the nearest location of the box's level is positive even when the box is smaller than a stride
        distance = ((points[:, None, :] - centres[None]) ** 2).sum(-1).masked_fill(~on_level, math.inf)
        candidate[distance.argmin(dim=0), torch.arange(boxes.shape[0], device=points.device)] = True
        areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(count, -1)
        areas = areas.masked_fill(~candidate, math.inf)
        best_area, best = areas.min(dim=1)
        return torch.where(torch.isfinite(best_area), best, torch.full_like(best, -1))

    def losses(self, predictions: DensePredictions, targets: Sequence[Tensor],
               normalise: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """Proposal losses against each image's ground-truth boxes (M_i, 4) xyxy in input pixels:
        objectness (sigmoid focal over every location), and on the positive locations GIoU and L1 of the
        boxes (L1 in strides) and centre-ness (binary cross-entropy). Each is a sum divided by the number of
        positives, or by `normalise(number)` (distributed training: the mean number over the ranks)."""
        assigned = [self.assign(predictions, boxes.to(predictions.points)) for boxes in targets]
        positive = torch.stack([a >= 0 for a in assigned])                      # (B, N)
        count = positive.sum().float()
        count = (normalise(count) if normalise is not None else count).clamp(min=1).to(predictions.objectness.dtype)
        objectness = sigmoid_focal_loss(predictions.objectness, positive.to(predictions.objectness.dtype),
                                        reduction="sum") / count
        matched = torch.cat([boxes.to(predictions.points)[a[a >= 0]] for boxes, a in zip(targets, assigned)])
        if matched.numel() == 0:  # no object in the batch: only the objectness loss teaches anything
            zero = predictions.distances.sum() * 0.0 + predictions.centreness.sum() * 0.0
            return {"objectness": objectness, "giou": zero, "l1": zero, "centreness": zero}
        batch_index, location = positive.nonzero(as_tuple=True)
        points, strides = predictions.points[location], predictions.strides[location, None]
        predicted = predictions.distances[batch_index, location]
        target = torch.cat([points - matched[:, :2], matched[:, 2:] - points], dim=1).clamp(min=0)
        giou = generalized_box_iou_loss(decode_boxes(points, predicted), matched, reduction="sum") / count
        l1 = F.l1_loss(predicted / strides, target / strides, reduction="sum") / (4 * count)
        lr, tb = target[:, [0, 2]], target[:, [1, 3]]
        centre_target = ((lr.min(1).values / lr.max(1).values.clamp(min=1e-6))
                         * (tb.min(1).values / tb.max(1).values.clamp(min=1e-6))).clamp(min=0).sqrt()
        centreness = F.binary_cross_entropy_with_logits(predictions.centreness[batch_index, location],
                                                        centre_target, reduction="sum") / count
        return {"objectness": objectness, "giou": giou, "l1": l1, "centreness": centreness}

    # -------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def propose(self, predictions: DensePredictions, image_size: tuple[int, int],
                num_proposals: int | None = None) -> Proposals:
        """The top `num_proposals` boxes of each image after class-agnostic NMS, clipped to the image
        (height, width); padded with zero-score, invalid whole-image boxes when fewer survive."""
        keep_count = num_proposals or self.config.num_proposals
        height, width = image_size
        scores = (predictions.objectness.float().sigmoid() * predictions.centreness.float().sigmoid()).sqrt()
        boxes = decode_boxes(predictions.points, predictions.distances.float())
        boxes = torch.stack([boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height),
                             boxes[..., 2].clamp(0, width), boxes[..., 3].clamp(0, height)], dim=-1)
        batch = scores.shape[0]
        out_boxes = boxes.new_tensor([0.0, 0.0, width, height]).repeat(batch, keep_count, 1)
        out_scores = scores.new_zeros(batch, keep_count)
        out_valid = torch.zeros(batch, keep_count, dtype=torch.bool, device=scores.device)
        top = min(self.config.pre_nms_top_k, scores.shape[1])
        for i in range(batch):
            score, index = scores[i].topk(top)
            candidates = boxes[i, index]
            sane = torch.isfinite(candidates).all(1) & (candidates[:, 2] > candidates[:, 0]) & (
                candidates[:, 3] > candidates[:, 1])
            score, candidates = score[sane], candidates[sane]
            kept = batched_nms(candidates, score, torch.zeros_like(score, dtype=torch.long),
                               self.config.nms_iou)[:keep_count]
            out_boxes[i, : len(kept)] = candidates[kept]
            out_scores[i, : len(kept)] = score[kept]
            out_valid[i, : len(kept)] = True
        return Proposals(out_boxes, out_scores, out_valid)


def box_places(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """xyxy boxes (..., 4) in pixels -> (..., 4) centre x, centre y, width, height, each over the image's side."""
    height, width = image_size
    scale = boxes.new_tensor([width, height])
    return torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2 / scale, (boxes[..., 2:] - boxes[..., :2]) / scale], -1)


def box_encoding(boxes: Tensor, image_size: tuple[int, int], frequencies: int) -> Tensor:
    """xyxy boxes (..., 4) in pixels -> (..., 8 x frequencies) sines and cosines of (cx, cy, w, h), each
    divided by the image's side (`box_places`), at frequencies 2^0 .. 2^(F-1) times pi."""
    coordinates = box_places(boxes, image_size)[..., None]                         # (..., 4, 1)
    bands = math.pi * 2.0 ** torch.arange(frequencies, device=boxes.device, dtype=boxes.dtype)
    angles = coordinates * bands
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class RegionTokens(nn.Module):
    """Boxes on the backbone maps -> region tokens (B, K, width): RoI-aligned features of each box on one level
    (the FPN rule: larger boxes read coarser levels) plus a projection of the box's sine-cosine encoding."""

    def __init__(self, config: RegionConfig, channels: Sequence[int], strides: Sequence[int], width: int):
        super().__init__()
        self.config = config
        self.strides = [int(s) for s in strides]
        self.lateral = nn.ModuleList(nn.Conv2d(c, config.width, 1) for c in channels)
        self.feature_proj = nn.Linear(config.width * config.roi_size ** 2, width)
        self.box_proj = nn.Linear(8 * config.box_frequencies, width)
        self.norm = nn.LayerNorm(width)

    def levels_for(self, boxes: Tensor) -> Tensor:
        """(R, 4) boxes -> (R,) level indices: a box whose side is about roi_size strides reads that level."""
        sides = ((boxes[:, 2] - boxes[:, 0]).clamp(min=1) * (boxes[:, 3] - boxes[:, 1]).clamp(min=1)).sqrt()
        strides = torch.tensor(self.strides, device=boxes.device, dtype=boxes.dtype)
        wanted = sides[:, None] / (self.config.roi_size * strides[None])   # 1 where the box spans roi_size cells
        return (wanted.log2().abs()).argmin(dim=1)

    def forward(self, maps: Sequence[Tensor], boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
        batch, count = boxes.shape[:2]
        flat = boxes.reshape(-1, 4).to(maps[0].dtype)
        batch_index = torch.arange(batch, device=boxes.device).repeat_interleave(count).to(flat.dtype)
        rois = torch.cat([batch_index[:, None], flat], dim=1)
        levels = self.levels_for(flat)
        size = self.config.roi_size
        pooled = flat.new_zeros(flat.shape[0], self.config.width, size, size)
        for index, (lateral, feature, stride) in enumerate(zip(self.lateral, maps, self.strides)):
            picked = (levels == index).nonzero(as_tuple=True)[0]
            projected = lateral(feature)
            if picked.numel() == 0:
                pooled = pooled + 0.0 * projected.sum()  # every lateral gets a gradient, as ZeRO-3 needs
                continue
            # under CPU autocast roi_align returns bf16 while the buffer keeps the boxes' float32
            pooled = pooled.index_put((picked,), roi_align(projected, rois[picked], size, spatial_scale=1 / stride,
                                                           sampling_ratio=2, aligned=True).to(pooled.dtype))
        features = self.feature_proj(pooled.flatten(1))
        encoded = self.box_proj(box_encoding(flat, image_size, self.config.box_frequencies))
        return self.norm(features + encoded).view(batch, count, -1)


def match_regions(regions: Tensor, boxes: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Regions (K, 4) against ground-truth boxes (M, 4) -> (K,) the index of each region's best box and
    (K,) whether that IoU reaches `threshold`. Degenerate boxes (NaN IoU) count as no overlap."""
    if boxes.numel() == 0 or regions.numel() == 0:
        empty = torch.zeros(regions.shape[0], dtype=torch.long, device=regions.device)
        return empty, torch.zeros_like(empty, dtype=torch.bool)
    iou = torch.nan_to_num(box_iou(regions.float(), boxes.float()), nan=0.0)
    best, index = iou.max(dim=1)
    return index, best >= threshold
