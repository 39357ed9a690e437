"""Where a training process runs: its device and rank, whether it computes in bf16, and the DeepSpeed module
when the engine drives the step. `setup_runtime` is the one place that starts torch.distributed."""
from __future__ import annotations

import os
import socket
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

    @property
    def collective_device(self) -> torch.device:
        """Where small tensors for collectives live: the GPU under NCCL, the CPU under gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def print(self, *args, **kwargs) -> None:
        """print() on rank 0 only, so a message appears once however many ranks run."""
        if self.is_main:
            print(*args, **kwargs)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """The ranks leave together and take the process group down (a rank exiting with gloo's threads up
        can die in std::terminate). A world of one keeps its group, so a process may train again."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on some rank."""
        if self.world_size == 1:
            return bool(flag)
        tensor = torch.tensor([float(flag)], device=self.collective_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_by_a_launcher() -> bool:
    """deepspeed, torchrun and mpirun-style launchers set RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_runtime(use_deepspeed: bool, device: str = "auto", bf16: bool | str = "auto") -> Runtime:
    """A plain loop, or DeepSpeed over torch.distributed (NCCL on GPUs, gloo on CPUs; started as a world of one
    when no launcher set the ranks). device: auto, cpu or cuda. bf16: True, False or "auto" (on where the GPU
    supports it; never on a CPU, where training runs in fp32)."""
    cuda_available = torch.cuda.is_available()
    cuda = cuda_available if device == "auto" else device == "cuda"
    if cuda and not cuda_available:
        raise RuntimeError("device cuda: no CUDA device is visible")
    if bf16 is True and not cuda:
        raise ValueError("bf16 needs a GPU; on a CPU training runs in fp32 (use bf16 auto or false)")
    use_bf16 = cuda and (bf16 is True or (bf16 == "auto" and torch.cuda.is_bf16_supported()))
    if not use_deepspeed:
        return Runtime(torch.device("cuda" if cuda else "cpu"), bf16=use_bf16)
    import deepspeed

    if not launched_by_a_launcher():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    run_device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(run_device)
    return Runtime(run_device, dist.get_rank(), dist.get_world_size(), bf16=use_bf16, deepspeed=deepspeed)
