"""Unmixed task sampling (Uni-Perceiver v2): at each optimizer step every rank trains the same task, drawn from
Categorical(ratios) by a generator seeded with (seed, step). The draw has no state, so every rank and every
resume point agree on the task of a step without a broadcast."""
from __future__ import annotations

import math
from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """The generator seed of (seed, step): a 63-bit hash, so that neighbouring steps and neighbouring seeds give
    unrelated draws (seed * N + step would make (0, N) and (1, 0) the same)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) >> 1


class UnmixedTaskSampler:
    """Which task step `step` trains: `sampler.task_at(step)`.

    task_names: the tasks, in a fixed order (every rank must pass the same order);
    ratios: their sampling weights (>= 0, not all zero), normalised to probabilities;
    seed: the run's seed.
    """

    def __init__(self, task_names: Sequence[str], ratios: Sequence[float], seed: int = 0):
        task_names, ratios = list(task_names), [float(r) for r in ratios]
        if not task_names:
            raise ValueError("UnmixedTaskSampler: no tasks")
        if len(set(task_names)) != len(task_names):
            duplicates = sorted({n for n in task_names if task_names.count(n) > 1})
            raise ValueError(f"UnmixedTaskSampler: task names must be distinct; repeated: {duplicates}")
        if len(ratios) != len(task_names):
            raise ValueError(f"UnmixedTaskSampler: {len(task_names)} task names {task_names} but {len(ratios)} ratios")
        bad = {n: r for n, r in zip(task_names, ratios) if not math.isfinite(r) or r < 0}
        if bad:
            raise ValueError(f"UnmixedTaskSampler: ratios must be finite and >= 0; got {bad}")
        total = sum(ratios)
        if total <= 0:
            raise ValueError(f"UnmixedTaskSampler: the ratios {dict(zip(task_names, ratios))} sum to zero; "
                             "at least one task needs a positive ratio")
        self.task_names = task_names
        self.seed = int(seed)
        self.probabilities = [r / total for r in ratios]
        # float64 cumulative bounds; the last is exactly 1 so a draw in [0, 1) always lands on a task
        cumulative = torch.tensor(self.probabilities, dtype=torch.float64).cumsum(0)
        cumulative[-1] = 1.0
        self._cumulative = cumulative

    def probability(self, name: str) -> float:
        """The normalised sampling ratio s_k of a task (what TBGN's `set_task` takes)."""
        if name not in self.task_names:
            raise KeyError(f"unknown task {name!r}; the sampler has {self.task_names}")
        return self.probabilities[self.task_names.index(name)]

    def index_at(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"UnmixedTaskSampler: step must be >= 0, got {step}")
        generator = torch.Generator(device="cpu")
        generator.manual_seed(step_seed(self.seed, int(step)))
        u = torch.rand((), generator=generator, dtype=torch.float64)
        # right=True: a task with ratio 0 has an empty interval and is never drawn
        return int(torch.searchsorted(self._cumulative, u, right=True).clamp_(max=len(self.task_names) - 1))

    def task_at(self, step: int) -> str:
        """The task every rank trains at optimizer step `step` (all micro-steps of that step use it too)."""
        return self.task_names[self.index_at(step)]

    def counts(self, steps: int | range) -> dict[str, int]:
        """How many of the steps `range(steps)` (or the given range) draw each task."""
        steps = range(steps) if isinstance(steps, int) else steps
        counts = dict.fromkeys(self.task_names, 0)
        for step in steps:
            counts[self.task_at(step)] += 1
        return counts

    def __repr__(self) -> str:
        shown = ", ".join(f"{n}: {p:.3g}" for n, p in zip(self.task_names, self.probabilities))
        return f"UnmixedTaskSampler({{{shown}}}, seed={self.seed})"
