"""What every format loader shares: the map-style base class, the layout error for a missing file, and
`SkipBadImages`, the wrapper that turns an unreadable image into a counted, logged skip.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..samples import MissingImageError, Sample, UnreadableImageError

logger = logging.getLogger("data_recipes.formats")


class LayoutError(FileNotFoundError):
    """A file or folder that a dataset layout requires is missing."""


def require(path: str | os.PathLike, fmt: str, layout: str, kind: str = "file") -> Path:
    """Return `path` if it exists, else raise a LayoutError naming it and the layout the format expects."""
    path = Path(path)
    exists = path.is_dir() if kind == "folder" else path.is_file()
    if not exists:
        raise LayoutError(f"{path}: no such {kind}; the {fmt} layout expects {layout}")
    return path


def find_first(candidates: list[Path], fmt: str, layout: str) -> Path:
    """The first existing file among `candidates`; a LayoutError naming the first one otherwise."""
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return require(candidates[0], fmt, layout)


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class ImageDataset(Dataset):
    """A map-style dataset of `Sample`s. Subclasses fill `self.records` (anything) and implement `_sample`.

    `task_fields` names the Sample fields the dataset fills; `class_names` (classification) and
    `categories` (detection: {category_id: name}) are set where they apply."""

    format_name = "base"
    task_fields: tuple[str, ...] = ()
    layout = ""  # the README's one-line description of the expected layout

    def __init__(self):
        self.records: list = []
        self.class_names: list[str] | None = None
        self.categories: dict[int, str] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self._sample(self.records[index])

    def _sample(self, record) -> Sample:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, fields={list(self.task_fields)})"


class _RateLimitedWarning:
    """Log the first `first` warnings, then every `every`-th, so a folder of bad files cannot flood the log."""

    def __init__(self, first: int = 10, every: int = 100):
        self.first, self.every, self.count = first, every, 0

    def __call__(self, message: str, *args) -> None:
        self.count += 1
        if self.count <= self.first or self.count % self.every == 0:
            suffix = " (further warnings are rate-limited)" if self.count == self.first else ""
            logger.warning(message + suffix, *args)


_MAX_WORKERS = 256
_KINDS = ("missing", "unreadable")


class SkipBadImages(Dataset):
    """Wrap a dataset so a sample whose image is missing or cannot be decoded is skipped, counted and logged
    (with the file name; rate-limited) instead of stopping the run.

    Map-style: item i returns the first good sample at i, i+1, ... (wrapping around), with its image decoded.
    Iterable (webdataset): bad samples are dropped from the stream.

    `.skipped` is a Counter {"missing": n, "unreadable": n} of skips (a bad file that two neighbouring indices
    both fall back past is counted twice; `python -m data_recipes check` counts distinct files). The counts live in a small shared-memory tensor
    with one row per DataLoader worker, so with `num_workers > 0` the main process sees the sum of every
    worker's skips (with the fork start method and with spawn; a worker's row is written only by it). Call
    `report()` at the end of a run to log the totals."""

    def __init__(self, dataset, max_tries: int = 100):
        self.dataset = dataset
        self.max_tries = max_tries
        self._counts = torch.zeros(_MAX_WORKERS + 1, len(_KINDS), dtype=torch.int64).share_memory_()
        self._warn = _RateLimitedWarning()

    def __getattr__(self, name):  # task_fields, class_names, categories... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> Counter:
        totals = self._counts.sum(0).tolist()
        return Counter({kind: int(n) for kind, n in zip(_KINDS, totals)})

    def _row(self) -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % _MAX_WORKERS

    def _good(self, sample: Sample) -> bool:
        try:
            sample.image  # noqa: B018  (decodes now)
            return True
        except MissingImageError as error:
            kind, message = "missing", str(error)
        except UnreadableImageError as error:
            kind, message = "unreadable", str(error)
        self._counts[self._row(), _KINDS.index(kind)] += 1
        self._warn("skipping sample %s: %s", sample.image_id, message)
        return False

    def __getitem__(self, index: int) -> Sample:
        n = len(self.dataset)
        for step in range(min(self.max_tries, n)):
            sample = self.dataset[(index + step) % n]
            if self._good(sample):
                return sample
        raise RuntimeError(f"{self.max_tries} consecutive samples from index {index} have missing or "
                           f"unreadable images; is the image root right? (skipped so far: {dict(self.skipped)})")

    def __iter__(self) -> Iterator[Sample]:
        for sample in self.dataset:
            if self._good(sample):
                yield sample

    def report(self) -> Counter:
        """Log the skip counts and return them."""
        skipped = self.skipped
        if sum(skipped.values()):
            logger.warning("skipped %d missing and %d unreadable images", skipped["missing"], skipped["unreadable"])
        return skipped


class SkipBadImagesIterable(SkipBadImages, IterableDataset):
    """`SkipBadImages` for an IterableDataset (so DataLoader treats it as one)."""

    __getitem__ = None  # type: ignore[assignment]


def skip_bad_images(dataset, max_tries: int = 100) -> SkipBadImages:
    """Wrap `dataset` in the SkipBadImages flavour that matches its style (map-style or iterable)."""
    cls = SkipBadImagesIterable if isinstance(dataset, IterableDataset) else SkipBadImages
    return cls(dataset, max_tries=max_tries)
