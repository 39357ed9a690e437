"""Webdataset tar shards for corpora too large for one disk: `key.jpg|png|webp` + `key.txt` (a caption)
and/or `key.json` (any fields), streamed shard by shard with the `webdataset` package."""
from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from typing import Iterator

import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from ..samples import Sample
from .base import LayoutError

logger = logging.getLogger("data_recipes.formats")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
# json keys that map onto Sample fields; everything else goes to Sample.extra
SAMPLE_KEYS = {"captions", "question", "question_id", "answers", "multiple_choice_answer", "answer_type",
               "question_type", "label", "boxes", "category_ids", "categories", "iscrowd", "width", "height"}


def expand_urls(urls: str) -> list[str]:
    """'shard-{000000..000009}.tar' -> ten names; several patterns may be joined with '::' (as in webdataset)."""
    from braceexpand import braceexpand
    return [url for part in urls.split("::") for url in braceexpand(part)]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


class WebDatasetShards(IterableDataset):
    """An IterableDataset of `Sample`s streamed from tar shards. Shards are split across distributed ranks and
    DataLoader workers (each worker reads whole shards, so use at least num_workers x world_size shards).
    Local shards that are missing are reported (`.missing_shards`) and skipped; a corrupt tar member is
    logged, counted in `.stream_errors` (per worker) and skipped. `len()` scans the tar headers once,
    unless `length=N` is given."""

    format_name = "webdataset"
    layout = "shard-{000000..000009}.tar, each holding key.jpg|png + key.txt (caption) and/or key.json (fields)"

    def __init__(self, urls: str, length: str | int | None = None, shuffle: str | int = 0,
                 fields: str = "captions"):
        self.urls = expand_urls(urls)
        local = [u for u in self.urls if _is_local(u)]
        self.missing_shards = [u for u in local if not os.path.isfile(u)]
        if local and len(self.missing_shards) == len(self.urls):
            raise LayoutError(f"{self.missing_shards[0]}: no such file (and {len(self.missing_shards) - 1} more "
                              f"shards missing); the webdataset layout expects {self.layout}")
        for url in self.missing_shards:
            logger.warning("webdataset: shard %s is missing; skipping it", url)
        self.shards = [u for u in self.urls if u not in set(self.missing_shards)]
        self._length = int(length) if length is not None else None
        self.shuffle = int(shuffle)
        self.task_fields = tuple(f for f in fields.split(",") if f)
        self.class_names = None
        self.categories = None
        self.stream_errors: Counter = Counter()

    def _handler(self, error: Exception) -> bool:
        self.stream_errors[type(error).__name__] += 1
        logger.warning("webdataset: skipping a corrupt shard member: %s", error)
        return True  # continue with the next member / shard

    def _sample(self, item: dict) -> Sample:
        key, url = item["__key__"], item.get("__url__", "")
        image_key = next((k for k in IMAGE_KEYS if k in item), None)
        name = f"{url}:{key}.{image_key}" if image_key else f"{url}:{key} (no image member)"
        sample = Sample(image_id=key, image_source=item.get(image_key) if image_key else None, image_name=name)
        if "txt" in item:
            sample.captions = [item["txt"].decode("utf-8", errors="replace").strip()]
        if "json" in item:
            try:
                meta = json.loads(item["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                self._handler(ValueError(f"{url}:{key}.json: {error}"))
                meta = {}
            if isinstance(meta, dict):
                if "caption" in meta:
                    sample.captions = [str(meta.pop("caption")).strip()]
                if "image_id" in meta:
                    sample.image_id = meta.pop("image_id")
                for field_name in list(meta):
                    if field_name in SAMPLE_KEYS:
                        setattr(sample, field_name, meta.pop(field_name))
                sample.extra.update(meta)
        return sample

    def __iter__(self) -> Iterator[Sample]:
        try:
            import webdataset as wds
        except ImportError as error:
            raise ImportError("the webdataset format needs the webdataset package: pip install webdataset") from error
        info = get_worker_info()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        readers = (info.num_workers if info else 1) * world
        if len(self.shards) < readers:
            raise ValueError(f"webdataset: {len(self.shards)} shard(s) for {readers} readers (DataLoader workers x "
                             f"ranks); every reader needs at least one shard: write more shards or use fewer workers")
        pipeline = wds.WebDataset(self.shards, handler=self._handler, shardshuffle=self.shuffle or False,
                                  nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                                  empty_check=False)
        if self.shuffle:
            pipeline = pipeline.shuffle(self.shuffle)
        for item in pipeline:
            yield self._sample(item)

    def __len__(self) -> int:
        if self._length is None:
            self._length = sum(_count_samples(url) for url in self.shards if _is_local(url))
        return self._length

    def __repr__(self) -> str:
        return f"WebDatasetShards({len(self.shards)} shards, fields={list(self.task_fields)})"


def _count_samples(path: str) -> int:
    """Samples in one shard: distinct keys (the name up to the first dot), read from the tar headers only."""
    keys = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    keys.add(os.path.join(os.path.dirname(member.name), os.path.basename(member.name).split(".")[0]))
    except (tarfile.TarError, OSError) as error:
        logger.warning("webdataset: cannot count the samples of %s: %s", path, error)
    return len(keys)
