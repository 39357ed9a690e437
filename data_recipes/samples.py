"""The one sample type every dataset loader returns: an image that is opened only when asked for, its id,
and the fields of the tasks the dataset serves (captions, a question and its answers, a label, boxes).
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field, fields
from typing import Any

from PIL import Image, UnidentifiedImageError

# What PIL raises on a file that is not an image, is truncated or is corrupt inside.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class MissingImageError(FileNotFoundError):
    """The image file a sample points to does not exist."""

    def __init__(self, name: str):
        super().__init__(f"{name}: no such image file")
        self.name = name


class UnreadableImageError(OSError):
    """The image exists but cannot be opened or decoded (not an image, truncated, corrupt)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: unreadable image ({reason})")
        self.name = name
        self.reason = reason


def load_image(source: Any, name: str | None = None, mode: str | None = "RGB") -> Image.Image:
    """Open and fully decode an image from a path, raw bytes, a {"bytes", "path"} dict (Hugging Face
    `Image(decode=False)`) or a PIL image. Raises MissingImageError or UnreadableImageError naming the file."""
    if isinstance(source, dict):  # Hugging Face datasets' undecoded image
        source = source.get("bytes") or source.get("path")
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<image bytes>")
    if isinstance(source, Image.Image):
        image = source
    elif source is None:
        raise MissingImageError(name)
    else:
        if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
            raise MissingImageError(name)
        try:
            stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
            image = Image.open(stream)
            image.load()  # decode now: a truncated or corrupt file fails here, not later in a transform
        except UnidentifiedImageError:
            raise UnreadableImageError(name, "not an image, or a format PIL cannot identify") from None
        except _DECODE_ERRORS as error:
            raise UnreadableImageError(name, f"{type(error).__name__}: {error}") from None
    if mode is not None and image.mode != mode:
        try:
            image = image.convert(mode)
        except _DECODE_ERRORS as error:
            raise UnreadableImageError(name, f"{type(error).__name__}: {error}") from None
    return image


@dataclass
class Sample:
    """One example. `image` is opened on first access (`image_source` is a path, bytes or a PIL image);
    the task fields a dataset does not have stay None. Boxes are COCO [x, y, width, height] in pixels."""

    image_id: Any
    image_source: Any = field(default=None, repr=False)
    image_name: str | None = None  # the file (or shard member) named in errors and reports
    split: str | None = None
    # captioning / retrieval
    captions: list[str] | None = None
    # VQA (VQAv2: the 10 human answers, the most common one, and the answer type)
    question: str | None = None
    question_id: Any = None
    answers: list[str] | None = None
    multiple_choice_answer: str | None = None
    answer_type: str | None = None
    question_type: str | None = None
    # classification: an index into the dataset's `class_names`
    label: int | None = None
    # detection: one entry per box
    boxes: list[list[float]] | None = None
    category_ids: list[int] | None = None
    categories: list[str] | None = None
    iscrowd: list[int] | None = None
    # the image size the annotation declares (COCO), used to check boxes without decoding
    width: int | None = None
    height: int | None = None
    extra: dict = field(default_factory=dict)  # any other fields (webdataset json, Hugging Face columns)
    _image: Image.Image | None = field(default=None, repr=False, compare=False)

    @property
    def image(self) -> Image.Image:
        """The RGB image, decoded on first access; raises MissingImageError / UnreadableImageError."""
        if self._image is None:
            self._image = load_image(self.image_source, self.image_name)
        return self._image

    def to_dict(self) -> dict:
        """A plain dict: "image" (decoded), "image_id" and the fields that are set, with `extra` merged in."""
        out: dict = {"image": self.image}
        for f in fields(self):
            if f.name in ("image_source", "_image", "extra"):
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        out.update(self.extra)
        return out


def collate_samples(batch: list[Sample]) -> list[Sample]:
    """DataLoader collate_fn that keeps the samples as a list (tasks build their own tensors)."""
    return list(batch)
