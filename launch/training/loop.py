"""One optimizer step for every launcher, in a plain loop or under DeepSpeed, with gradient accumulation and
one policy for non-finite values: every rank agrees whether a micro-batch's loss is finite before any backward
pass, and a step with a NaN/inf loss or gradient norm is skipped on every rank (no weight and no optimizer
moment changes); `NonfiniteGuard` stops a run after too many in a row."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .runtime import Runtime


class TrainingStopped(RuntimeError):
    """The run cannot go on (repeated non-finite steps); the message says why and what to try."""


@dataclass
class StepOutcome:
    losses: list[float] = field(default_factory=list)  # one per micro-batch computed (NaN/inf included)
    skipped: str | None = None                          # why the step was skipped: "loss" or "gradient norm"
    grad_norm: float | None = None
    seconds: float = 0.0

    @property
    def finite(self) -> bool:
        return self.skipped is None

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def touch_every_parameter(params: list[nn.Parameter]) -> torch.Tensor:
    """0 x (one element of every parameter): added to the loss, it gives the parameters a task does not use a
    zero gradient instead of none, so the plain loop and DeepSpeed treat idle parameters alike (as
    Uni-Perceiver v1 does under unmixed sampling)."""
    return torch.stack([p.reshape(-1)[0] for p in params]).sum() * 0.0


class StepRunner:
    """Runs optimizer steps of `model`. Plain: backward per micro-batch (scaled by 1/accumulation), clipping at
    `grad_clip`, `optimizer.step()`. DeepSpeed: `engine.backward` and `engine.step` per micro-batch, so the
    engine's own micro-step counter places the accumulation boundary (it scales by 1/accumulation itself, and
    clips by its `gradient_clipping`).

    A skipped step under DeepSpeed. When a loss is non-finite before any micro-batch of the step went backward,
    nothing is handed to the engine: no gradient, no `engine.step()`, so no moment, step count or weight moves.
    When it comes after (accumulation > 1), the gradients already reduced cannot be taken back from DeepSpeed's
    partitioned buffers; the step is then finished with zero-gradient micro-steps and taken at learning rate 0
    (weights unchanged), with the optimizer's moments and step counts saved before and put back after, so they
    do not advance either. DeepSpeed's own overflow check (ZeRO 1/2 with clipping) skipping a step is reported
    as a skipped step too."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime, engine: Any = None,
                 grad_clip: float | None = None, accumulation: int = 1, touch_idle: bool = True):
        self.model, self.optimizer, self.runtime, self.engine = model, optimizer, runtime, engine
        self.grad_clip, self.accumulation = grad_clip, int(accumulation)
        self.zero3 = engine is not None and engine.zero_optimization_stage() == 3
        # under ZeRO-3 parameters are partitioned outside a forward; DeepSpeed handles idle ones itself there
        self.idle_params = [p for p in model.parameters() if p.requires_grad] if touch_idle and not self.zero3 else []
        if engine is not None and engine.gradient_accumulation_steps() != self.accumulation:
            raise ValueError(f"gradient accumulation: the engine was configured for "
                             f"{engine.gradient_accumulation_steps()} micro-steps, the step runner for "
                             f"{self.accumulation}")

    @property
    def forward(self) -> nn.Module:
        """What a loss calls for the model's forward: the engine under DeepSpeed, which acts around it (ZeRO counts
        its micro-steps there: called past it, ZeRO-3 copies a micro-batch's gradients over the previous one's
        instead of adding them)."""
        return self.engine if self.engine is not None else self.model

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.engine is not None and self.runtime.bf16 else torch.float32

    def _agree(self, loss: torch.Tensor) -> tuple[bool, float]:
        """Whether the loss is finite on every rank, and its mean over the ranks (the loss of the global batch,
        for the tasks whose losses are means over equal shares): one all-reduce."""
        value = loss.detach().float().reshape(()).cpu()
        if self.runtime.world_size == 1:
            return bool(torch.isfinite(value)), value.item()
        finite = bool(torch.isfinite(value))
        both = torch.stack([value if finite else torch.zeros(()), torch.tensor(float(not finite))])
        both = self.runtime.all_reduce_sum(both.to(self.runtime.collective_device)).cpu()
        if both[1] > 0:
            return False, value.item() if not finite else float("nan")
        return True, both[0].item() / self.runtime.world_size

    def _zero_loss(self) -> torch.Tensor:
        if self.idle_params:
            return touch_every_parameter(self.idle_params)
        return torch.zeros((), device=self.runtime.device, requires_grad=True)

    def step(self, next_batch: Callable[[], Any], loss_of: Callable[[nn.Module, Any], torch.Tensor],
             weight: float = 1.0) -> StepOutcome:
        """One optimizer step over `accumulation` micro-batches: `next_batch()` gives each (it is called for
        every micro-batch, even in a skipped step, so the data streams stay where an uninterrupted run would
        be); `loss_of(forward, batch)` its scalar loss (logged as is), which trains multiplied by `weight`;
        `forward` is the module to call (the engine under DeepSpeed, see `forward`)."""
        started = time.perf_counter()
        outcome = StepOutcome()
        plain, backwarded = self.engine is None, 0
        self.model.train()
        if plain:
            self.optimizer.zero_grad(set_to_none=True)
        for _ in range(self.accumulation):
            batch = next_batch()
            if outcome.skipped:
                continue
            with torch.autocast(self.runtime.device.type, dtype=torch.bfloat16, enabled=plain and self.runtime.bf16):
                loss = loss_of(self.forward, batch).float()
            finite, mean = self._agree(loss)
            outcome.losses.append(mean)
            if not finite:
                outcome.skipped = "loss"
                continue
            total = loss * weight if weight != 1.0 else loss
            if self.idle_params:
                total = total + touch_every_parameter(self.idle_params)
            if plain:
                (total / self.accumulation).backward()
            else:
                self.engine.backward(total)
                self.engine.step()
            backwarded += 1
        if plain:
            self._plain_update(outcome)
        elif outcome.skipped and backwarded:
            self._finish_skipped_engine_step(self.accumulation - backwarded)
        elif not outcome.skipped:
            self._read_engine_step(outcome)
        outcome.seconds = time.perf_counter() - started
        return outcome

    def _plain_update(self, outcome: StepOutcome) -> None:
        if not outcome.skipped:
            params = [p for p in self.model.parameters() if p.grad is not None]
            limit = self.grad_clip if self.grad_clip else math.inf
            norm = float(nn.utils.clip_grad_norm_(params, limit)) if params else 0.0
            outcome.grad_norm = norm
            if not math.isfinite(norm):
                outcome.skipped = "gradient norm"
            else:
                self.optimizer.step()
                if getattr(self.optimizer, "last_step_skipped", False):  # TBGN found the norm non-finite
                    outcome.skipped = "gradient norm"
        self.optimizer.zero_grad(set_to_none=True)

    def _read_engine_step(self, outcome: StepOutcome) -> None:
        norm = self.engine.get_global_grad_norm()
        outcome.grad_norm = float(norm) if norm is not None else None
        if getattr(self.optimizer, "last_step_skipped", False) or not self.engine.was_step_applied():
            outcome.skipped = "gradient norm"

    def _finish_skipped_engine_step(self, remaining: int) -> None:
        saved_lr = [group["lr"] for group in self.optimizer.param_groups]
        saved_state = {param: {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
                       for param, state in self.optimizer.state.items()}
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        for _ in range(remaining):
            self.engine.backward(self._zero_loss())
            self.engine.step()
        for param, state in list(self.optimizer.state.items()):
            if param in saved_state:
                self.optimizer.state[param] = saved_state[param]
            else:  # a state created by this very step
                del self.optimizer.state[param]
        for group, lr in zip(self.optimizer.param_groups, saved_lr):
            group["lr"] = lr


class NonfiniteGuard:
    """Counts skipped steps in a row and stops the run after `max_consecutive` of them."""

    def __init__(self, max_consecutive: int, consecutive: int = 0):
        self.max_consecutive, self.consecutive = max_consecutive, consecutive

    def record(self, outcome: StepOutcome, step: int, what: str) -> str | None:
        """A message for a skipped step (None for a good one); raises TrainingStopped after too many."""
        if outcome.finite:
            self.consecutive = 0
            return None
        self.consecutive += 1
        message = (f"step {step}: {what} gave a non-finite {outcome.skipped} (loss {outcome.loss}); the step was "
                   f"skipped on every rank ({self.consecutive} in a row)")
        if self.consecutive >= self.max_consecutive:
            raise TrainingStopped(
                f"stopping: {self.consecutive} consecutive steps had a non-finite loss or gradient (the last at step "
                f"{step}, {what}); the weights are those of the last good step. Lower the learning rate, lengthen "
                f"the warm-up or check the data (at most {self.max_consecutive} in a row are skipped)")
        return message
