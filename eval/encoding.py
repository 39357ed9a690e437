"""What the benchmark suites share: batching a rank's share of a dataset of `Sample`s through the model with a
progress bar, and loading the annotation-free parts (images, texts) in the model's own preprocessing."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

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


def load_images(model, samples: Sequence[Any]) -> Tensor:
    """Samples -> a (B, 3, S, S) batch on the model's device, through the evaluation transform (resize,
    centre crop, ImageNet normalisation) at the model's image size."""
    from tasks.base import stack_images

    return stack_images([sample.image for sample in samples], model_image_size(model)).to(model_device(model))


def map_in_batches(world: EvalWorld, count: int, fn: Callable[[list[int]], Sequence[Any]], batch_size: int,
                   progress: bool, description: str) -> list[Any] | None:
    """fn(indices) -> one output per index, over this rank's share of range(count), `batch_size` at a time;
    rank 0 gets every output in order, other ranks None."""
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


def encode_images(model, world: EvalWorld, dataset, batch_size: int, progress: bool,
                  indices: Sequence[int] | None = None) -> Tensor | None:
    """(N, D) unit image embeddings of `dataset[indices]` (default: all) on rank 0, None elsewhere."""
    picked = list(range(len(dataset))) if indices is None else list(indices)

    def encode(batch: list[int]) -> Tensor:
        return F.normalize(model.encode_image(load_images(model, [dataset[picked[i]] for i in batch])).float(),
                           dim=-1)

    rows = map_in_batches(world, len(picked), encode, batch_size, progress, "images")
    return None if rows is None else torch.stack(rows)


def encode_texts(model, world: EvalWorld, texts: Sequence[str], batch_size: int, progress: bool,
                 description: str = "texts") -> Tensor | None:
    """(N, D) unit text embeddings (as candidate texts) on rank 0, None elsewhere."""
    def encode(batch: list[int]) -> Tensor:
        return F.normalize(model.encode_text([texts[i] for i in batch]).float(), dim=-1)

    rows = map_in_batches(world, len(texts), encode, batch_size, progress, description)
    return None if rows is None else torch.stack(rows)


def first(count: int, limit: int | None) -> list[int]:
    """The indices a `--limit` keeps: the first `limit` of `count` (all when None)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return list(range(count if limit is None else min(limit, count)))
