"""Unmixed task sampling (Uni-Perceiver v2): at each optimizer step every rank trains the same task, drawn from
Categorical(ratios) by a generator seeded with (seed, step). The draw has no state, so every rank and every
resume point agree on the task of a step without a broadcast.

A task's ratio may also move over the run (`ratios_end`): its weight goes linearly from `ratio` at step 0 to
`ratio_end` at the last step, and the weights are normalised at each step. The probabilities of a step are a
function of the step alone, so the draw stays stateless. A task that needs what the others learn first (VQA
reads the shapes retrieval and detection teach the picture side) can take a small share early and a large one
late."""
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
    seed: the run's seed;
    ratios_end: optional weights at step `steps - 1` (None for a task keeps its ratio); between, each weight
    moves linearly with the step, and from `steps - 1` on it stays at its end value;
    steps: the run's length, needed with `ratios_end`.
    """

    def __init__(self, task_names: Sequence[str], ratios: Sequence[float], seed: int = 0,
                 ratios_end: Sequence[float | None] | None = None, steps: int | None = None):
        task_names, ratios = list(task_names), [float(r) for r in ratios]
        if not task_names:
            raise ValueError("UnmixedTaskSampler: no tasks")
        if len(set(task_names)) != len(task_names):
            duplicates = sorted({n for n in task_names if task_names.count(n) > 1})
            raise ValueError(f"UnmixedTaskSampler: task names must be distinct; repeated: {duplicates}")
        if len(ratios) != len(task_names):
            raise ValueError(f"UnmixedTaskSampler: {len(task_names)} task names {task_names} but {len(ratios)} ratios")
        self._check_weights(task_names, ratios, "ratio")
        ends = self._end_ratios(task_names, ratios, ratios_end, steps)
        self.task_names = task_names
        self.seed = int(seed)
        self.ratios, self.ratios_end = ratios, ends
        self.steps = None if ends is None else int(steps)
        self.probabilities = self.probabilities_at(0)
        self._cumulative = self._bounds(self.probabilities)

    @staticmethod
    def _check_weights(task_names: list[str], weights: list[float], kind: str) -> None:
        """Every weight finite and >= 0, and their sum positive; `kind` ("ratio", "end ratio") names them."""
        bad = {n: w for n, w in zip(task_names, weights) if not math.isfinite(w) or w < 0}
        if bad:
            raise ValueError(f"UnmixedTaskSampler: {kind}s must be finite and >= 0; got {bad}")
        if sum(weights) <= 0:
            raise ValueError(f"UnmixedTaskSampler: the {kind}s {dict(zip(task_names, weights))} sum to zero; "
                             f"at least one task needs a positive {kind}")

    @classmethod
    def _end_ratios(cls, task_names: list[str], ratios: list[float], ratios_end, steps) -> list[float] | None:
        if ratios_end is None or all(end is None for end in ratios_end):
            return None
        ratios_end = list(ratios_end)
        if len(ratios_end) != len(task_names):
            raise ValueError(f"UnmixedTaskSampler: {len(task_names)} task names {task_names} but "
                             f"{len(ratios_end)} end ratios")
        ends = [r if end is None else float(end) for r, end in zip(ratios, ratios_end)]
        # the weights are linear in the step: a positive sum at both ends is a positive sum throughout
        cls._check_weights(task_names, ends, "end ratio")
        if steps is None or int(steps) < 1:
            raise ValueError(f"UnmixedTaskSampler: end ratios need the run's length, steps >= 1; got {steps!r}")
        return ends

    @staticmethod
    def _bounds(probabilities: list[float]) -> torch.Tensor:
        # float64 cumulative bounds; the last is exactly 1 so a draw in [0, 1) always lands on a task
        cumulative = torch.tensor(probabilities, dtype=torch.float64).cumsum(0)
        cumulative[-1] = 1.0
        return cumulative

    def probabilities_at(self, step: int) -> list[float]:
        """The normalised sampling probabilities of step `step`, in task order."""
        if self.ratios_end is None:
            weights = self.ratios
        else:
            t = min(max(int(step), 0) / max(self.steps - 1, 1), 1.0)
            weights = [r + (e - r) * t for r, e in zip(self.ratios, self.ratios_end)]
        total = sum(weights)
        return [w / total for w in weights]

    def probability(self, name: str, step: int = 0) -> float:
        """The normalised sampling ratio s_k of a task at step `step` (what TBGN's `set_task` takes)."""
        if name not in self.task_names:
            raise KeyError(f"unknown task {name!r}; the sampler has {self.task_names}")
        return self.probabilities_at(step)[self.task_names.index(name)]

    def index_at(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"UnmixedTaskSampler: step must be >= 0, got {step}")
        generator = torch.Generator(device="cpu")
        generator.manual_seed(step_seed(self.seed, int(step)))
        u = torch.rand((), generator=generator, dtype=torch.float64)
        cumulative = self._cumulative if self.ratios_end is None else self._bounds(self.probabilities_at(step))
        # right=True: a task with ratio 0 has an empty interval and is never drawn
        return int(torch.searchsorted(cumulative, u, right=True).clamp_(max=len(self.task_names) - 1))

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
        scheduled = self.ratios_end is not None
        last = self.probabilities_at(self.steps - 1) if scheduled else self.probabilities
        shown = ", ".join(f"{n}: {p:.3g}" + (f" -> {q:.3g}" if abs(p - q) > 1e-12 else "")
                          for n, p, q in zip(self.task_names, self.probabilities, last))
        return f"UnmixedTaskSampler({{{shown}}}, seed={self.seed}" + (f", steps={self.steps})" if scheduled else ")")
