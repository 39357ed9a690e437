"""Evaluation split across ranks: under `torchrun` or `deepspeed` every rank encodes every world_size-th item
and rank 0 gathers the outputs in the original order and computes the metrics (they need the whole split:
retrieval ranks every image against every text, CIDEr's IDF comes from all references).

A single process is a world of one, and nothing here touches torch.distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class EvalWorld:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, count: int) -> list[int]:
        """The indices of `count` items this rank evaluates (every world_size-th, from its rank)."""
        return list(range(self.rank, count, self.world_size))

    def gather(self, count: int, local: Sequence[Any]) -> list[Any] | None:
        """Rank 0: the outputs of all ranks for items 0..count-1 in order (each rank gives the outputs of its
        `shard(count)`); other ranks: None. Tensors travel to CPU first."""
        # clone: a row of a batch is a view, and pickling a view sends the whole batch it points into
        local = [item.detach().cpu().clone() if isinstance(item, torch.Tensor) else item for item in local]
        if self.world_size == 1:
            return list(local)
        parts: list[Any] = [None] * self.world_size if self.is_main else None
        dist.gather_object(local, parts, dst=0)
        if not self.is_main:
            return None
        ordered: list[Any] = [None] * count
        for rank, part in enumerate(parts):
            for index, item in zip(range(rank, count, self.world_size), part):
                ordered[index] = item
        return ordered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group together: every rank waits for the others, then destroys it. A rank that
        exits while gloo's threads are still up can die in std::terminate, failing the launch."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def eval_world(device: torch.device | None = None) -> EvalWorld:
    """The world this process belongs to: initialised from the launcher's RANK / WORLD_SIZE (torchrun, the
    deepspeed launcher) when they are set, else a world of one. gloo on CPUs, NCCL on GPUs; gather_object
    moves Python objects, so small evaluation outputs are fine on either."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return EvalWorld()
    if not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return EvalWorld(dist.get_rank(), dist.get_world_size())
