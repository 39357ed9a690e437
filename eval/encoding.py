"""What the benchmark suites share: batching a rank's share of a dataset of `Sample`s through the model with a
progress bar, and loading the annotation-free parts (images, texts) in the model's own preprocessing."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .distributed import EvalWorld


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def model_image_size(model, default: int = 224) -> int:
    size = getattr(getattr(getattr(model, "config", None), "image", None), "image_size", None)
    return int(size) if size else default


def progress_bar(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, leave=False, unit="item")


class _EvalImages(Dataset):
    """(position, image tensor) of dataset[picked[position]], decoded and transformed in DataLoader workers."""

    def __init__(self, dataset, picked: Sequence[int], image_size: int):
        from internimage.transforms import build_eval_transform

        self.dataset, self.picked = dataset, list(picked)
        self.transform = build_eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.picked)

    def __getitem__(self, position: int):
        return position, self.transform(self.dataset[self.picked[position]].image.convert("RGB"))


def map_images(model, world: EvalWorld, dataset, picked: Sequence[int],
               fn: Callable[[Tensor, list[int]], Sequence[Any]], batch_size: int, progress: bool,
               description: str = "images", workers: int = 0) -> list[Any] | None:
    """fn(images (B, 3, S, S) on the model's device, their positions in `picked`) -> one output per image, over
    this rank's share of dataset[picked]; images are decoded and resized by `workers` DataLoader processes (the
    evaluation transform at the model's image size). Rank 0 gets every output in order, other ranks None."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = _EvalImages(dataset, picked, model_image_size(model))
    mine = world.shard(len(picked))
    loader = DataLoader(Subset(images, mine), batch_size=batch_size, num_workers=workers, shuffle=False)
    device, outputs = model_device(model), []
    with progress_bar(len(mine), description, progress and world.is_main) as bar:
        for positions, batch in loader:
            result = fn(batch.to(device), positions.tolist())
            if len(result) != len(positions):
                raise RuntimeError(f"{description}: {len(result)} outputs for {len(positions)} images")
            outputs += list(result)
            bar.update(len(positions))
    return world.gather(len(picked), outputs)


def encode_images(model, world: EvalWorld, dataset, batch_size: int, progress: bool,
                  indices: Sequence[int] | None = None, workers: int = 0) -> Tensor | None:
    """(N, D) unit image embeddings of `dataset[indices]` (default: all) on rank 0, None elsewhere."""
    picked = list(range(len(dataset))) if indices is None else list(indices)
    rows = map_images(model, world, dataset, picked,
                      lambda images, _: F.normalize(model.encode_image(images).float(), dim=-1),
                      batch_size, progress, "images", workers)
    return None if rows is None else torch.stack(rows)


def map_in_batches(world: EvalWorld, count: int, fn: Callable[[list[int]], Sequence[Any]], batch_size: int,
                   progress: bool, description: str) -> list[Any] | None:
    """fn(indices) -> one output per index, over this rank's share of range(count), `batch_size` at a time;
    rank 0 gets every output in order, other ranks None. (Texts: no decoding to parallelise.)"""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mine = world.shard(count)
    outputs: list[Any] = []
    with progress_bar(len(mine), description, progress and world.is_main) as bar:
        for start in range(0, len(mine), batch_size):
            indices = mine[start:start + batch_size]
            batch = fn(indices)
            if len(batch) != len(indices):
                raise RuntimeError(f"{description}: {len(batch)} outputs for {len(indices)} inputs")
            outputs += list(batch)
            bar.update(len(indices))
    return world.gather(count, outputs)


def encode_texts(model, world: EvalWorld, texts: Sequence[str], batch_size: int, progress: bool,
                 description: str = "texts") -> Tensor | None:
    """(N, D) unit text embeddings (as candidate texts) on rank 0, None elsewhere."""
    def encode(batch: list[int]) -> Tensor:
        return F.normalize(model.encode_text([texts[i] for i in batch]).float(), dim=-1)

    rows = map_in_batches(world, len(texts), encode, batch_size, progress, description)
    return None if rows is None else torch.stack(rows)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")


def first(count: int, limit: int | None) -> list[int]:
    """The indices a `--limit` keeps: the first `limit` of `count` (all when None)."""
    _check_limit(limit)
    return list(range(count if limit is None else min(limit, count)))


def spread(count: int, limit: int | None) -> list[int]:
    """`limit` indices evenly spaced over range(count) (all when None): a fair `--limit` sample of a dataset
    sorted by class, where the first N would cover only the first classes."""
    _check_limit(limit)
    if limit is None or limit >= count:
        return list(range(count))
    return sorted({(i * count) // limit for i in range(limit)})


def require_samples(dataset, suite: str) -> None:
    """A clear error for a split with nothing in it (a wrong --split or --format), naming the annotation file."""
    if len(dataset) == 0:
        source = next((getattr(dataset, name) for name in ("annotation_path", "questions_path", "root")
                       if getattr(dataset, name, None) is not None), "the dataset")
        raise ValueError(f"suite {suite}: {source} has no samples in split {getattr(dataset, 'split', None)!r}; "
                         "check --split (and --format for captions)")
