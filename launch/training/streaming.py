"""The data path of pretraining for streaming (webdataset) datasets: an endless, deterministic, resumable stream
of one task's batches read from tar shards, decoded (and augmented) in DataLoader workers.

Readers. A rank with `workers` DataLoader processes runs W = max(workers, 1) logical readers (workers=0: one, in
the training process); the run has R = world_size x W, reader g = rank x W + w. In epoch e all readers draw the
same permutation `perm` of the shard list from (seed, stream, e), and reader g reads shards perm[g::R] in order,
the samples of a shard in tar order. There is no shuffle buffer (the webdataset format's `shuffle=` option is not
used here): a batch holds neighbouring samples of one shard, or of two where it spans a shard's or an epoch's
end. Each reader loops over its epochs on its own, forever. Its position is its cursor (epoch, slot in its shard
list, sample offset in that shard), counting every sample of the tar, bad ones too.

Batches. The DataLoader yields its workers' batches round-robin, worker 0, 1, ... (torch's documented order for
an IterableDataset, `in_order=True` by default); each batch carries its reader's cursor after it, so the state
holds, per reader, the position of the batches the training loop has consumed (not those prefetched), and the
number consumed. A sample's random draws (the caption retrieval trains on, the augmentation) come from
(seed, stream, epoch, reader, slot, offset), never from a worker's generator. A sample whose image cannot be
decoded is skipped and counted in the dataset's `SkipBadImages` counters.

Exact: resumed with the same world size and W (workers=0 and workers=1 are the same W = 1) and the same shard
files, every reader continues at its cursor and the round-robin at its phase (worker w serves reader
(w + consumed) mod W): the run sees exactly the batches, in the same order and with the same random draws, of an
uninterrupted one. Skipping to an offset inside a shard reads tar headers only; no image is decoded.
Not exact: with another world size or W the readers cannot be mapped onto the new ones, so every reader restarts
at the start of the lowest epoch any reader had reached (a note says so): the samples already read in that
epoch are read again and the batches differ from the uninterrupted run. The skip counters also count the
batches prefetched but not consumed, and a resumed run counts those skips again.
"""
from __future__ import annotations

import contextlib
import logging
import re
import tarfile
import zlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .data import sample_for_task, unwrap_dataset
from .seeding import DATA_ORDER, SAMPLE, derive_seed, epoch_permutation, local_seed

logger = logging.getLogger("launch.training")

# As webdataset groups a tar: the key is the name up to the first dot of its last part; "__x__" names are meta.
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _open(url: str):
    if "://" not in url and not url.startswith("pipe:"):
        return open(url, "rb")
    from webdataset.gopen import gopen
    return gopen(url)


def tar_samples(url: str, skip: int = 0) -> Iterator[dict[str, Any]]:
    """The samples of one shard as webdataset groups them ({"__key__", "__url__", suffix: bytes}), from sample
    `skip` on: the members of the samples before it are passed over unread."""
    with contextlib.closing(_open(url)) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        index, key, sample = -1, None, None
        for member in tar:
            tar.members = []  # streaming mode keeps every header otherwise
            match = _KEY.match(member.name) if member.isreg() else None
            if match is None or _META.match(member.name):
                continue
            if match.group(1) != key:
                if sample is not None:
                    yield sample
                index, key = index + 1, match.group(1)
                sample = {"__key__": key, "__url__": url} if index >= skip else None
            if sample is not None:
                sample.setdefault(match.group(2).lower(), tar.extractfile(member).read())
        if sample is not None:
            yield sample


class ShardReaders:
    """What every reader needs (picklable, so DataLoader workers get a copy): the shards, the seeds, and how a
    tar sample becomes a collated batch."""

    def __init__(self, name: str, dataset, kind: str, collate: Callable, batch_size: int, seed: int, readers: int,
                 augment: Callable | None):
        self.inner = unwrap_dataset(dataset)
        self.skipper = dataset if dataset is not self.inner and hasattr(dataset, "_good") else None
        self.name, self.kind, self.collate, self.batch_size = name, kind, collate, batch_size
        self.seed, self.readers, self.augment = seed, readers, augment
        self.shards = list(self.inner.shards)

    def shards_of(self, reader: int, epoch: int) -> list[str]:
        order = epoch_permutation(self.seed, epoch, len(self.shards))
        return [self.shards[i] for i in order[reader::self.readers]]

    def positions(self, reader: int, cursor: list[int]) -> Iterator[tuple[int, int, int, dict]]:
        """(epoch, slot, offset, tar sample) of reader `reader` from `cursor` on, forever. A shard that cannot
        be read is counted in the dataset's `stream_errors`, logged, and left for the next."""
        epoch, slot, offset = cursor
        while True:
            shards, found = self.shards_of(reader, epoch), slot > 0 or offset > 0
            for slot in range(slot, len(shards)):
                try:
                    for offset, item in enumerate(tar_samples(shards[slot], offset), offset):
                        found = True
                        yield epoch, slot, offset, item
                except _TAR_ERRORS as error:
                    handler = getattr(self.inner, "_handler", None)
                    if handler is None:
                        raise
                    logger.warning("tasks.%s: shard %s cannot be read on; going on with the next", self.name,
                                   shards[slot])
                    handler(error)
                offset = 0
            if not found:
                shown = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
                raise ValueError(f"recipe tasks.{self.name}.dataset: reader {reader} found no sample in its shards "
                                 f"{shown} (epoch {epoch})")
            epoch, slot, offset = epoch + 1, 0, 0

    def batches(self, reader: int, cursor: list[int]) -> Iterator[tuple[Any, list[int]]]:
        """(collated batch, the reader's cursor after it), forever."""
        records, bad = [], 0
        for epoch, slot, offset, item in self.positions(reader, cursor):
            sample = self.inner._sample(item)
            if self.skipper is not None and not self.skipper._good(sample):
                bad += 1
                if bad >= getattr(self.skipper, "max_tries", 100):
                    raise RuntimeError(f"recipe tasks.{self.name}.dataset: {bad} consecutive samples up to "
                                       f"{sample.image_name} have missing or unreadable images")
                continue
            bad = 0
            seed = derive_seed(self.seed, SAMPLE, epoch, reader, slot, offset)
            record = sample_for_task(self.kind, sample, seed)
            if self.augment is not None and hasattr(record.get("image"), "convert"):
                with local_seed(seed):
                    record["image"] = self.augment(record["image"].convert("RGB"))
            records.append(record)
            if len(records) == self.batch_size:
                yield self.collate(records), [epoch, slot, offset + 1]
                records = []


class _WorkerReaders(IterableDataset):
    """DataLoader worker w serves this rank's reader (w + phase) mod W, from its cursor."""

    def __init__(self, readers: ShardReaders, rank: int, per_rank: int, cursors: list[list[int]], phase: int):
        self.readers, self.rank, self.per_rank, self.cursors, self.phase = readers, rank, per_rank, cursors, phase

    def __iter__(self):
        info = get_worker_info()
        local = ((info.id if info is not None else 0) + self.phase) % self.per_rank
        for batch, cursor in self.readers.batches(self.rank * self.per_rank + local, self.cursors[local]):
            yield batch, local, cursor


def _as_is(item):
    return item


class ShardStream:
    """One task's batches from a sharded streaming dataset, with TaskStream's interface (`next_batch()`,
    `state_dict()`/`load_state_dict()`, `close()`); see the module docstring for the order and what a resume
    keeps exactly. `state_dict()` gathers every rank's cursors (a collective under torch.distributed: call it
    on every rank, as the checkpoint code does), since only rank 0 writes the checkpoint's client state."""

    def __init__(self, name: str, index: int, dataset, kind: str, collate: Callable, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, workers: int = 0, augment: Callable | None = None):
        self.name, self.rank, self.world_size, self.workers = name, rank, world_size, workers
        self.per_rank = max(workers, 1)
        self.seed = derive_seed(seed, DATA_ORDER, index)
        inner = unwrap_dataset(dataset)
        if not hasattr(inner, "shards") or not hasattr(inner, "_sample"):
            raise TypeError(f"recipe tasks.{name}.dataset: {type(inner).__name__} is a streaming dataset without "
                            "tar shards; pretraining streams webdataset shards only")
        readers = world_size * self.per_rank
        if len(inner.shards) < readers:
            raise ValueError(f"recipe tasks.{name}.dataset: {len(inner.shards)} shard(s) for {readers} readers "
                             f"({world_size} rank(s) x {self.per_rank} DataLoader worker(s)); every reader needs at "
                             "least one shard: write more shards, or lower workers")
        if getattr(inner, "shuffle", 0):
            logger.warning("tasks.%s: the webdataset shuffle=%s option is not used: shards are read in tar order",
                           name, inner.shuffle)
        self.readers = ShardReaders(name, dataset, kind, collate, batch_size, self.seed, readers, augment)
        self.cursors = [[0, 0, 0] for _ in range(self.per_rank)]
        self.consumed = 0
        self._iterator = None

    def _start(self) -> Iterator:
        phase = self.consumed % self.per_rank
        source = _WorkerReaders(self.readers, self.rank, self.per_rank, [list(c) for c in self.cursors], phase)
        if self.workers == 0:
            return iter(source)
        # A generator of its own, so the loader never draws from the global one the training step uses.
        return iter(DataLoader(source, batch_size=None, num_workers=self.workers, collate_fn=_as_is,
                               prefetch_factor=2, generator=torch.Generator().manual_seed(self.seed)))

    def next_batch(self) -> Any:
        if self._iterator is None:
            self._iterator = self._start()
        batch, local, cursor = next(self._iterator)
        if local != self.consumed % self.per_rank:
            raise RuntimeError(f"tasks.{self.name}: batch {self.consumed} came from reader {local}, not "
                               f"{self.consumed % self.per_rank}: the DataLoader did not keep its workers' order")
        self.cursors[local], self.consumed = list(cursor), self.consumed + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        gathered = {self.rank: self.cursors}
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks: list = [None] * self.world_size
            dist.all_gather_object(ranks, self.cursors)
            gathered = dict(enumerate(ranks))
        cursors: list = [None] * (self.world_size * self.per_rank)
        for rank, mine in gathered.items():
            cursors[rank * self.per_rank:(rank + 1) * self.per_rank] = [list(c) for c in mine]
        return {"world_size": self.world_size, "per_rank": self.per_rank, "consumed": self.consumed,
                "cursors": cursors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "cursors" not in state:
            raise ValueError(f"tasks.{self.name}: the checkpoint's stream state (keys {sorted(state)}) is not a "
                             "shard stream's; was the task trained on a map-style dataset?")
        self.close()
        recorded = [c for c in state["cursors"] if c is not None]
        mine = state["cursors"][self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        same = (int(state["world_size"]), int(state["per_rank"])) == (self.world_size, self.per_rank)
        if same and len(mine) == self.per_rank and all(c is not None for c in mine):
            self.cursors, self.consumed = [[int(v) for v in c] for c in mine], int(state["consumed"])
            return
        epoch = min(int(c[0]) for c in recorded) if recorded else 0
        self.cursors, self.consumed = [[epoch, 0, 0] for _ in range(self.per_rank)], 0
        if self.rank == 0 or same:
            why = ("lacks the cursors of this rank's readers" if same else
                   f"was written by {state['world_size']} rank(s) x {state['per_rank']} reader(s), this run has "
                   f"{self.world_size} x {self.per_rank}")
            print(f"note: tasks.{self.name}: the stream state {why}: the shards are re-assigned and every reader "
                  f"restarts at the start of epoch {epoch}, so batches differ from the uninterrupted run")

    def close(self) -> None:
        """Stops the DataLoader workers (or closes the in-process reader and its open shard)."""
        stop = getattr(self._iterator, "_shutdown_workers", None) or getattr(self._iterator, "close", None)
        if stop is not None:
            stop()
        self._iterator = None
