"""Pictures in, model inputs out: the image processor saved with a model, and the one place that turns what a user
holds (PIL images, numpy arrays, file paths, tensors; one or a batch) into normalised pixels on the model's device.

    processor = ImageProcessor(size=64)
    pixels = processor(["cat.jpg", pil_image, numpy_array])      # (3, 3, 64, 64), ImageNet-normalised
    processor.save_pretrained(folder)                           # preprocessor_config.json

Conventions: a float tensor is taken as pixels already preprocessed (normalised, at the model's size), which is what
the tasks and evaluation suites pass; a uint8 tensor, like a numpy array or a picture file, holds raw pixels and
goes through the processor.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

PROCESSOR_FILE = "preprocessor_config.json"
IMAGENET_MEAN, IMAGENET_STD = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)  # the release's statistics
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESIZE_MODES = ("shortest_edge", "square")


@dataclass
class ImageProcessor:
    """How a picture becomes the model's input.

    size: the model's square input side in pixels.
    resize: "shortest_edge" (the short side to `size`, then a centre crop: the release's evaluation preprocessing
        and what every task trains on) or "square" (both sides to `size`, no crop: detection, where nothing may be
        cut off).
    interpolation: "bicubic", "bilinear" or "nearest".
    mean, std: per-channel normalisation of pixels in [0, 1].
    """
    size: int = 224
    resize: str = "shortest_edge"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        problems = []
        if not isinstance(self.size, int) or self.size < 1:
            problems.append(f"size {self.size!r}: expected a positive integer")
        if self.resize not in RESIZE_MODES:
            problems.append(f"resize {self.resize!r}: expected one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation {self.interpolation!r}: expected one of {INTERPOLATIONS}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append(f"mean {self.mean} and std {self.std}: expected three values each, std positive")
        if problems:
            raise ValueError("image processor: " + "; ".join(problems))
        self._transforms: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return {"processor": type(self).__name__, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / PROCESSOR_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "ImageProcessor":
        path = Path(folder) / PROCESSOR_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no image processor (written by save_pretrained)") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        data.pop("processor", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; an image processor has {sorted(known)}")
        try:
            return cls(**data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    # --------------------------------------------------------------------------------------------- transform
    def transform(self, resize: str | None = None):
        """The torchvision pipeline from a PIL picture to a normalised (3, size, size) tensor."""
        resize = resize or self.resize
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize {resize!r}: expected one of {RESIZE_MODES}")
        if resize not in self._transforms:
            from torchvision import transforms

            mode = transforms.InterpolationMode(self.interpolation)
            steps = ([transforms.Resize(self.size, interpolation=mode), transforms.CenterCrop(self.size)]
                     if resize == "shortest_edge" else [transforms.Resize((self.size, self.size), interpolation=mode)])
            self._transforms[resize] = transforms.Compose(
                [*steps, transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])
        return self._transforms[resize]

    def __call__(self, images: Any, argument: str = "images", resize: str | None = None) -> Tensor:
        return self.preprocess(images, argument, resize)[0]

    def preprocess(self, images: Any, argument: str = "images", resize: str | None = None
                   ) -> tuple[Tensor, list[tuple[int, int]]]:
        """Any supported input -> (B, 3, size, size) float pixels and each picture's (height, width) before
        resizing. Float tensors pass through as preprocessed pixels (checked for shape); everything else is read
        as raw pixels and transformed. Errors name `argument` and the offending item."""
        if isinstance(images, Tensor) and images.is_floating_point():
            self._check_preprocessed(images, argument)
        items = as_picture_list(images, argument)
        transform, pixels, sizes = None, [], []
        for index, item in enumerate(items):
            where = argument if isinstance(images, Tensor) or not isinstance(images, (list, tuple)) \
                else f"{argument}[{index}]"
            if isinstance(item, Tensor) and item.is_floating_point():
                self._check_preprocessed(item, where)
                pixels.append(item)
                sizes.append((self.size, self.size))
                continue
            picture = to_pil(item, where)
            transform = transform or self.transform(resize)
            sizes.append((picture.height, picture.width))
            pixels.append(transform(picture))
        devices = {p.device for p in pixels}
        if len(devices) > 1:
            raise ValueError(f"{argument}: tensors on several devices {sorted(map(str, devices))}")
        return torch.stack([p.float() if p.dtype != pixels[0].dtype else p for p in pixels]), sizes


    def _check_preprocessed(self, tensor: Tensor, where: str) -> None:
        side = (self.size, self.size)
        if tensor.dim() not in (3, 4) or tensor.shape[-3] != 3 or tuple(tensor.shape[-2:]) != side:
            raise ValueError(f"{where}: a float tensor is taken as preprocessed pixels of shape (3, {self.size}, "
                             f"{self.size}) (or batched, (B, 3, {self.size}, {self.size})); got {tuple(tensor.shape)}. "
                             "Pass PIL images, paths, numpy arrays or uint8 tensors to have them resized and "
                             "normalised")


def as_picture_list(images: Any, argument: str = "images") -> list:
    """One picture or a batch (a list, a (B, ...) tensor or array) -> a list of single pictures."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{argument}: no images")
        items = []
        for i, item in enumerate(images):
            if isinstance(item, (list, tuple)):
                raise TypeError(f"{argument}[{i}]: a nested {type(item).__name__}; pass one flat list of pictures")
            items.extend(as_picture_list(item, f"{argument}[{i}]") if _is_batch(item) else [item])
        return items
    if _is_batch(images):
        if len(images) == 0:
            raise ValueError(f"{argument}: an empty batch")
        return list(images)
    return [images]


def _is_batch(item: Any) -> bool:
    """A (B, C, H, W) tensor or a (B, H, W, C) array: four dimensions."""
    return isinstance(item, (Tensor, np.ndarray)) and item.ndim == 4


def to_pil(item: Any, where: str = "image"):
    """A PIL image, a path, a (H, W[, C]) numpy array (uint8, or float in [0, 1]) or a uint8 (C, H, W) tensor ->
    an RGB PIL image. Errors name `where`."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: {path}: no such file")
        try:
            with Image.open(path) as picture:
                return picture.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"{where}: {path} is not a readable picture ({error})") from error
    if isinstance(item, Tensor):
        if item.dtype != torch.uint8:
            raise TypeError(f"{where}: a tensor of raw pixels must be uint8 (float tensors are preprocessed "
                            f"pixels), got {item.dtype}")
        if item.dim() != 3 or item.shape[0] not in (1, 3, 4):
            raise ValueError(f"{where}: a uint8 tensor must be (C, H, W) with 1, 3 or 4 channels, "
                             f"got {tuple(item.shape)}")
        item = item.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(item, np.ndarray):
        array = item
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"{where}: a numpy array must be (H, W), (H, W, 3) or (H, W, 4) (channels last), "
                             f"got shape {item.shape}")
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise TypeError(f"{where}: a numpy array must be uint8 or float in [0, 1], got {array.dtype}")
            if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1):
                raise ValueError(f"{where}: a float array must hold values in [0, 1], got "
                                 f"[{np.nanmin(array):.3g}, {np.nanmax(array):.3g}]")
            array = (np.nan_to_num(array) * 255).round().astype(np.uint8)
        if min(array.shape[:2]) < 1:
            raise ValueError(f"{where}: an empty picture of shape {item.shape}")
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    raise TypeError(f"{where}: expected a PIL image, a file path, a numpy array or a tensor, "
                    f"got {type(item).__name__}")


__all__ = ["ImageProcessor", "PROCESSOR_FILE", "as_picture_list", "to_pil"]

