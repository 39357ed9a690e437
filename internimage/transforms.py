"""The release's evaluation preprocessing: bicubic resize of the short side, centre crop, ImageNet
normalisation. Accuracy matches the published numbers only with exactly this pipeline."""
from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms


def build_eval_transform(size: int = 224):
    """PIL image -> normalised float tensor (3, size, size)."""
    if size < 1:
        raise ValueError(f"build_eval_transform: size must be positive, got {size}")
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
