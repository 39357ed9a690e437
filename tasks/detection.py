"""Detection: class-agnostic region proposals, then every region named by ranking the category names against its
token from the shared decoder (scaled cosine similarity, the `detection` family), so that any list of names works
at inference.

The loss is the proposal network's (objectness, GIoU, L1, centre-ness) plus softmax cross-entropy over the
category names on the regions that overlap a ground-truth box (IoU >= `match_iou`); the ground-truth boxes join
the proposals as regions in training, so that naming learns from well-placed boxes before the proposals are good.
Regions matching no box are not named: telling object from background is the objectness's job.

A sigmoid focal loss over the names (each name a binary "is it this?") was tried first on the shapes world: with
so few names sharing one text encoder, every region drifted onto the names' common direction and all names scored
alike; the softmax contrasts the names with each other and does not.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from uniperceiver.detection import resize_for_detection, scale_boxes
from uniperceiver.model import DEFAULT_TEMPLATES
from uniperceiver.region_proposals import match_regions

from .base import Task, mean_count_over_ranks, register_task, require_fields

LOSS_WEIGHTS = {"objectness": 1.0, "giou": 2.0, "l1": 1.0, "centreness": 1.0, "classification": 1.0}


def coco_to_xyxy(boxes: Sequence[Sequence[float]]) -> Tensor:
    """COCO [x, y, w, h] -> (N, 4) xyxy."""
    tensor = torch.tensor([list(map(float, box)) for box in boxes], dtype=torch.float32).reshape(-1, 4)
    return torch.cat([tensor[:, :2], tensor[:, :2] + tensor[:, 2:]], dim=1)


def pad_regions(parts: Sequence[Tensor], count: int) -> tuple[Tensor, Tensor]:
    """Per image (n_i, 4) boxes -> (B, count, 4) and valid (B, count); extra boxes beyond `count` are dropped."""
    boxes = torch.zeros(len(parts), count, 4, device=parts[0].device)
    valid = torch.zeros(len(parts), count, dtype=torch.bool, device=parts[0].device)
    for i, part in enumerate(parts):
        part = part[:count]
        boxes[i, : len(part)] = part
        valid[i, : len(part)] = True
    boxes[~valid] = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)  # a harmless box for padding
    return boxes, valid


@register_task("detection")
class DetectionTask(Task):
    """Batch: {"images": (B, 3, S, S), "boxes": [(n_i, 4) xyxy in those pixels], "labels": [(n_i,) indices into
    "category_names"], "sizes": [(height, width) of each picture]}. Predictions: per image a
    `uniperceiver.detection.Detections` in the picture's own pixels.

    category_names: the names the sample's "categories" are matched against (or None: the names each batch's
    samples carry, in order of appearance); templates: prompts with one "{}" for the name."""

    family = "detection"

    @classmethod
    def reads_boxes(cls, kwargs: dict[str, Any]) -> bool:
        return True

    def __init__(self, category_names: Sequence[str] | None = None, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 label_smoothing: float = 0.1, match_iou: float = 0.5, score_threshold: float = 0.05,
                 max_detections: int = 100, loss_weights: dict[str, float] | None = None, image_size: int = 224):
        super().__init__(image_size=image_size)
        bad = [t for t in templates if "{}" not in t]
        if not templates or bad:
            raise ValueError(f"detection: every template needs one '{{}}' for the category name; got {bad or 'none'}")
        unknown = sorted(set(loss_weights or {}) - set(LOSS_WEIGHTS))
        if unknown:
            raise ValueError(f"detection: loss_weights has unknown keys {unknown}; expected some of "
                             f"{sorted(LOSS_WEIGHTS)}")
        self.category_names = list(category_names) if category_names is not None else None
        self.templates = list(templates)
        self.label_smoothing, self.match_iou = label_smoothing, match_iou
        self.score_threshold, self.max_detections = score_threshold, max_detections
        self.loss_weights = {**LOSS_WEIGHTS, **(loss_weights or {})}

    def format_batch(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Samples {"image": PIL or (3, H, W) tensor, "boxes": COCO [x, y, w, h] in its pixels, "categories":
        names} -> the pictures resized to the model's square input, the boxes scaled with them."""
        require_fields(samples, ["image", "boxes", "categories"], self.name)
        names = list(self.category_names) if self.category_names is not None else list(
            dict.fromkeys(name for sample in samples for name in sample["categories"]))
        index = {name: i for i, name in enumerate(names)}
        model_size = (self.image_size, self.image_size)
        images, sizes, boxes, labels = [], [], [], []
        for i, sample in enumerate(samples):
            image = sample["image"]
            pixels, (size,) = resize_for_detection(image[None] if isinstance(image, Tensor) else [image],
                                                   self.image_size)
            images.append(pixels[0])
            sizes.append(size)
            if len(sample["boxes"]) != len(sample["categories"]):
                raise ValueError(f"task 'detection': sample {i} has {len(sample['boxes'])} boxes and "
                                 f"{len(sample['categories'])} categories")
            crowd = [int(flag) for flag in (sample.get("iscrowd") or [0] * len(sample["boxes"]))]
            if any(crowd):  # a COCO crowd region covers many objects at once: not a target box (as usual for COCO)
                kept = [k for k, flag in enumerate(crowd) if not flag]
                sample = {**sample, "boxes": [sample["boxes"][k] for k in kept],
                          "categories": [sample["categories"][k] for k in kept]}
            unknown = [name for name in sample["categories"] if name not in index]
            if unknown:
                raise ValueError(f"task 'detection': sample {i} has categories {unknown} outside the task's "
                                 f"{len(names)} category_names")
            boxes.append(scale_boxes(coco_to_xyxy(sample["boxes"]), size, model_size))
            labels.append(torch.tensor([index[name] for name in sample["categories"]], dtype=torch.long))
        return {"images": torch.stack(images), "boxes": boxes, "labels": labels, "category_names": names,
                "sizes": sizes}

    def losses(self, model, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Each weighted part of the loss, by name."""
        images = batch["images"]
        size = tuple(images.shape[-2:])
        targets = [boxes.to(images.device) for boxes in batch["boxes"]]
        tokens, kinds, maps = model.image_features(images)
        dense = model.region_proposer(maps)
        parts = model.region_proposer.losses(dense, targets, normalise=mean_count_over_ranks)
        proposals = model.region_proposer.propose(dense, size)
        regions = [torch.cat([gt, boxes[valid]]) for gt, boxes, valid in
                   zip(targets, proposals.boxes, proposals.valid)]
        count = max(len(r) for r in regions)
        boxes, valid = pad_regions(regions, count)
        embeddings = model.region_embeddings(tokens, kinds, maps, boxes, valid, size)
        names = model.category_embeddings(batch["category_names"], self.templates)
        logits = model.region_logits(embeddings, names)                               # (B, K, C)
        picked, labels = [], []
        for i, (gt, gt_labels) in enumerate(zip(targets, batch["labels"])):
            which, matched = match_regions(boxes[i], gt, self.match_iou)
            matched &= valid[i]
            picked.append(logits[i][matched])
            labels.append(gt_labels.to(images.device)[which[matched]])
        picked = torch.cat(picked)
        named = mean_count_over_ranks(torch.tensor(float(len(picked)), device=picked.device)).clamp(min=1)
        total = F.cross_entropy(picked.float(), torch.cat(labels), label_smoothing=self.label_smoothing,
                                reduction="sum") if len(picked) else (logits * 0.0).sum()
        parts["classification"] = total / named  # per named region of the global batch, as for the positives
        return {name: value * self.loss_weights[name] for name, value in parts.items()}

    def loss(self, model, batch: dict[str, Any]) -> Tensor:
        return sum(self.losses(model, batch).values())

    @torch.no_grad()
    def predict(self, model, batch: dict[str, Any]) -> list:
        detections = model.detect(batch["images"], batch["category_names"], self.score_threshold,
                                  self.max_detections, self.templates)
        size = tuple(batch["images"].shape[-2:])
        for item, picture in zip(detections, batch["sizes"]):  # back to each picture's own pixels
            item.boxes = scale_boxes(item.boxes, size, picture)
        return detections
