"""The data path of pretraining: an endless, deterministic, resumable stream of one task's batches, decoded
(and augmented) in DataLoader workers.

Map-style datasets: epoch e is a permutation drawn from (seed, stream, e); rank r takes every world_size-th index
of it; a batch is the next `batch_size` of those (an epoch's remainder is dropped). The position (epoch, index)
is the whole state, and a sample's random draws (its augmentation, the caption retrieval trains on) come from
(seed, stream, epoch, index): so a resumed run, with any number of workers, sees exactly the batches of an
uninterrupted one. Streaming datasets go through `launch.training.streaming`."""
from __future__ import annotations

import random
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .seeding import DATA_ORDER, SAMPLE, derive_seed, epoch_permutation, local_seed


def unwrap_dataset(dataset):
    """The format loader inside `SkipBadImages`."""
    return getattr(dataset, "dataset", dataset)


def sample_for_task(kind: str, sample, seed: int) -> dict[str, Any]:
    """A `Sample` as the dict the task's `format_batch` takes: captioning trains on the first caption (the others
    are references), retrieval on one caption drawn from `seed`, VQA on the most common answer. `seed` also rides
    along as "sample_seed", for a loss that draws noise per sample (text to image: the same noise for a sample
    however the global batch is split over ranks)."""
    record = sample.to_dict() if hasattr(sample, "to_dict") else dict(sample)
    record.setdefault("sample_seed", int(seed))
    captions = record.get("captions")
    if captions and "caption" not in record:
        if kind == "retrieval":
            record["caption"] = captions[random.Random(seed).randrange(len(captions))]
        else:
            record["caption"] = list(captions)
    if "answer" not in record and "question" in record:
        answer = record.get("multiple_choice_answer") or (record.get("answers") or [None])[0]
        if answer is not None:
            record["answer"] = answer
    return record


class TaskSamples(Dataset):
    """Item (epoch, index) of `dataset` as a task record, its image augmented under the sample's own seed."""

    def __init__(self, dataset, kind: str, seed: int, augment: Callable | None = None):
        self.dataset, self.kind, self.seed, self.augment = dataset, kind, seed, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        seed = derive_seed(self.seed, SAMPLE, epoch, index)
        record = sample_for_task(self.kind, self.dataset[index], seed)
        if self.augment is not None and hasattr(record.get("image"), "convert"):
            with local_seed(seed):
                record["image"] = self.augment(record["image"].convert("RGB"))
        return record


def advance(epoch: int, position: int, batch_size: int, per_rank: int) -> tuple[int, int]:
    """Where the next batch starts: the same epoch, or the start of the next when this one is used up."""
    return (epoch + 1, 0) if position + batch_size > per_rank else (epoch, position)


class ResumableBatches(Sampler):
    """Endless batches of (epoch, index) keys for one rank, from position (epoch, position) on."""

    def __init__(self, length: int, batch_size: int, seed: int, rank: int, world_size: int, epoch: int = 0,
                 position: int = 0):
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size, self.epoch, self.position = rank, world_size, epoch, position
        self.per_rank = length // world_size

    def order(self, epoch: int) -> list[int]:
        return epoch_permutation(self.seed, epoch, self.length)[self.rank::self.world_size]

    def __iter__(self):
        epoch, position, order = self.epoch, self.position, None
        while True:
            epoch, position = advance(epoch, position, self.batch_size, self.per_rank)
            if order is None or order[0] != epoch:
                order = (epoch, self.order(epoch))
            yield [(epoch, i) for i in order[1][position:position + self.batch_size]]
            position += self.batch_size


class TaskStream:
    """One task's batches: `next_batch()`, and `state_dict()`/`load_state_dict()` for checkpoints. `workers`
    DataLoader processes decode and collate (`collate`, the task's `format_batch`) ahead of the training step;
    the state counts the batches the training loop has taken, not those prefetched."""

    def __init__(self, name: str, index: int, dataset, kind: str, collate: Callable, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, workers: int = 0, augment: Callable | None = None):
        self.name, self.batch_size, self.workers, self.collate = name, batch_size, workers, collate
        self.seed = derive_seed(seed, DATA_ORDER, index)
        self.rank, self.world_size = rank, world_size
        self.samples = TaskSamples(dataset, kind, self.seed, augment)
        self.epoch, self.position = 0, 0
        self._iterator = None
        self.per_rank = len(dataset) // world_size
        if self.per_rank < batch_size:
            raise ValueError(f"recipe tasks.{name}: the dataset has {len(dataset)} samples, fewer than one batch of "
                             f"{batch_size} per rank on {world_size} rank(s); lower tasks.{name}.batch_size")

    def _loader(self) -> DataLoader:
        batches = ResumableBatches(len(self.samples), self.batch_size, self.seed, self.rank, self.world_size,
                                   self.epoch, self.position)
        # A generator of its own: the loader must not draw its workers' base seed from the global generator,
        # which the training step draws from (resume would then diverge).
        return DataLoader(self.samples, batch_sampler=batches, collate_fn=self.collate, num_workers=self.workers,
                          persistent_workers=self.workers > 0, generator=torch.Generator().manual_seed(self.seed),
                          prefetch_factor=2 if self.workers else None)

    def next_batch(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = iter(self._loader())
        batch = next(self._iterator)
        self.epoch, self.position = advance(self.epoch, self.position, self.batch_size, self.per_rank)
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iterator = None

    def close(self) -> None:
        self._iterator = None
