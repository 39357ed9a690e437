"""Small pretraining runs shared by the launcher and engine tests: the tiny recipe on 48 shapes images, the
pure-PyTorch DCN (no kernel build), and helpers to run it in-process, under a launcher's environment, or on
several gloo ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

SHAPES = "shapes?split=train&train_size=48&val_size=8&test_size=8"
TASK_NAMES = ("retrieval", "classification", "captioning", "vqa", "detection", "text_to_image")


def small_overrides(steps: int = 6, batch_size: int = 8, **extra) -> list[str]:
    """The tiny recipe on 48 shapes images, batches of `batch_size`, a checkpoint every 3 steps."""
    items = {"steps": steps, "optimizer.warmup_steps": 2, "checkpoint.every_steps": 3, "checkpoint.keep": 2,
             "log_every": 2, "model.image.backbone_overrides.dcn_backend": "reference"}
    for name in TASK_NAMES:
        items[f"tasks.{name}.dataset"] = SHAPES + ("&task=vqa" if name == "vqa" else "")
        items[f"tasks.{name}.eval_dataset"] = None
        items[f"tasks.{name}.batch_size"] = batch_size
    items.update(extra)
    return [f"{key}={'null' if value is None else value}" for key, value in items.items()]


def read_log(output: Path, event: str = "step") -> list[dict]:
    lines = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if line["event"] == event]


def model_state(output: Path, step: int) -> dict:
    return torch.load(output / "checkpoints" / f"step_{step:06d}" / "state.pt", weights_only=True)["model"]


def exported_weights(output: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint's export (the newest without `step`), plain run or DeepSpeed alike."""
    from safetensors.torch import load_file

    folder = output / "export" if step is None else output / "checkpoints" / f"step_{step:06d}" / "export"
    return load_file(str(folder / "model.safetensors"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(command: list[str], world_size: int, timeout: int = 600, env: dict | None = None) -> list[str]:
    """What the deepspeed launcher does on one machine: one process per rank, told its rank by the environment;
    returns each rank's output, failing with it if a rank fails."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        environment = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **(env or {}))
        procs.append(subprocess.Popen([sys.executable, *command], env=environment, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out[-5000:]}"
    return outputs
