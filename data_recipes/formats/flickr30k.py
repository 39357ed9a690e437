"""Flickr30k in the Karpathy split: ROOT/dataset_flickr30k.json and the images in ROOT/flickr30k-images/."""
from __future__ import annotations

from .coco_karpathy import KarpathyCaptions


class Flickr30k(KarpathyCaptions):
    """Flickr30k (Karpathy split: 29k train, 1k val, 1k test images, five captions each)."""

    format_name = "flickr30k"
    annotation_file = "dataset_flickr30k.json"
    layout = "ROOT/dataset_flickr30k.json and ROOT/flickr30k-images/"
    default_image_dir = "flickr30k-images"
