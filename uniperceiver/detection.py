"""Detection's plumbing around the model: pictures in at the model's size, boxes out in each picture's pixels.

`UniPerceiver.detect` resizes every picture to the model's square input (no crop, so no object is cut off and
a box maps back by a scale per axis), proposes regions, ranks the category names against each region token and
keeps the best (box, category) pairs here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.ops import batched_nms


@dataclass
class Detections:
    """One picture's detections: boxes (N, 4) xyxy in the picture's pixels, scores (N,), labels (N,) indices
    into the category list, best first."""
    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to_dict(self) -> dict[str, Any]:
        return {"boxes": self.boxes.tolist(), "scores": self.scores.tolist(), "labels": self.labels.tolist()}


def resize_for_detection(images: Tensor | Sequence[Any], size: int) -> tuple[Tensor, list[tuple[int, int]]]:
    """PIL pictures (any size) or a (B, 3, H, W) normalised tensor -> (B, 3, size, size) normalised and each
    picture's (height, width). PIL pictures are resized without a crop and normalised with ImageNet's
    statistics, as every task's evaluation preprocessing; tensors are resized bilinearly."""
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"detect: images must be (B, 3, H, W), got {tuple(images.shape)}")
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        return images, sizes
    from torchvision import transforms

    if len(images) == 0:
        raise ValueError("detect: no images")
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    batch, sizes = [], []
    for i, image in enumerate(images):
        if not hasattr(image, "convert"):
            raise TypeError(f"detect: image {i} must be a PIL image (or pass one (B, 3, H, W) tensor), "
                            f"got {type(image).__name__}")
        sizes.append((image.height, image.width))
        batch.append(transform(image.convert("RGB")))
    return torch.stack(batch), sizes


def scale_boxes(boxes: Tensor, source: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """xyxy boxes from a (height, width) picture to another size."""
    sy, sx = target[0] / source[0], target[1] / source[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def select_detections(boxes: Tensor, proposal_scores: Tensor, valid: Tensor, probabilities: Tensor,
                      model_size: tuple[int, int], picture_size: tuple[int, int], score_threshold: float,
                      max_detections: int, nms_iou: float = 0.5) -> Detections:
    """One picture's regions -> its detections. Every (region, category) pair is scored by the geometric mean of
    the region's objectness and the category's probability, so a region may stand for its second-best name
    too (which raises recall at low thresholds, as COCO's AP counts it); pairs below `score_threshold` go, NMS
    runs per category, the best `max_detections` stay.

    boxes (K, 4) in model pixels; proposal_scores, valid (K,); probabilities (K, C)."""
    scores = (proposal_scores[:, None].float().clamp(min=0) * probabilities.float()).sqrt()
    scores = scores.masked_fill(~valid[:, None], 0.0)
    region, label = (scores > score_threshold).nonzero(as_tuple=True)
    picked_scores, picked_boxes = scores[region, label], boxes[region].float()
    kept = batched_nms(picked_boxes, picked_scores, label, nms_iou)[:max_detections]
    return Detections(scale_boxes(picked_boxes[kept], model_size, picture_size).cpu(),
                      picked_scores[kept].cpu(), label[kept].cpu())
