"""The learning-rate schedule of every launcher: linear warm-up, then cosine to a floor (or constant), per
optimizer step, from timm. The schedule is a function of the step alone (`set_learning_rate(scheduler, step)`
before each step), so a resumed run needs no scheduler state and every rank agrees."""
from __future__ import annotations

from typing import Literal

import torch


def build_scheduler(optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int = 0,
                    warmup_lr: float = 0.0, min_lr: float = 0.0, kind: Literal["cosine", "constant"] = "cosine"):
    """timm's CosineLRScheduler over `total_steps`: optimizer step s (0-based) runs at update s + 1 of the
    schedule, so the first step already has lr warmup_lr + (lr - warmup_lr) / warmup_steps and the last ends at
    `min_lr`. Each group's `lr_scale` multiplies its rate (timm applies it). A warm-up longer than the run is
    allowed (a short trial of a long recipe): the rate then never peaks."""
    from timm.scheduler import CosineLRScheduler

    if kind not in ("cosine", "constant"):
        raise ValueError(f"schedule: expected 'cosine' or 'constant', got {kind!r}")
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = lr
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps),
                             lr_min=min_lr if kind == "cosine" else lr, warmup_t=warmup_steps,
                             warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=False)


def set_learning_rate(scheduler, step: int) -> float:
    """Sets every group's rate for optimizer step `step` (0-based); returns the unscaled rate."""
    scheduler.step_update(num_updates=step + 1)
    group = scheduler.optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)
