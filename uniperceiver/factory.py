"""One entry point from a name to a usable model, in the spirit of open_clip's `create_model_and_transforms`."""
from __future__ import annotations

from pathlib import Path

import torch

from .model import UniPerceiver
from .processing import ImageProcessor


def create_model_and_transforms(name_or_path: str | Path, device: str | torch.device | None = None,
                                dtype: torch.dtype | str | None = None) -> tuple[UniPerceiver, ImageProcessor]:
    """A saved model (local folder or hub id; see `UniPerceiver.from_pretrained`) in eval mode, and the image
    processor it was saved with: `processor(pictures)` gives the (B, 3, S, S) pixels its methods take. Every method
    also accepts the pictures themselves and runs the same processor."""
    model = UniPerceiver.from_pretrained(name_or_path, device=device, dtype=dtype)
    return model, model.image_processor
