"""Where a training process runs, shared by the training scripts: its device and rank, whether it computes in
bf16, and the DeepSpeed module when the engine drives the step. (launch/ is a folder of scripts, not a package;
the scripts put this folder on sys.path.) Each script fills it in from its own options: `setup_runtime`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    bf16: bool = False
    deepspeed: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on some rank."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())
