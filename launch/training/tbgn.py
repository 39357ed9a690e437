"""Task-Balanced Gradient Normalization (Uni-Perceiver v2; "MT-AdamW" in its first arXiv version): AdamW whose
gradient is normalised to a global L2 norm of ω_k and whose moment updates are divided by the task's sampling
ratio s_k, so that in expectation over unmixed task sampling every task adds ω_k unit gradients to the moments,
however often it is sampled."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

REDUCTIONS = ("local", "sum")


class TBGNAdamW(torch.optim.Optimizer):
    """AdamW with Task-Balanced Gradient Normalization.

    Call `set_task(task, sampling_ratio, weight)` before `step()`; the task stays set until the next call, so
    the training loop calls it once per optimizer step with the sampler's task.

    One step with task k (sampling ratio s_k, weight ω_k), for every parameter with a gradient:

        g   = ω_k · ∇L / ‖∇L‖                       ‖·‖: the L2 norm over ALL parameters (see grad_norm_reduction)
        m   = β1 · m + ((1 − β1) / s_k) · g
        v   = β2 · v + ((1 − β2) / s_k) · g²
        θ   = θ · (1 − lr · weight_decay)            decoupled weight decay, as AdamW
        θ   = θ − lr · (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + eps)

    The β convention. `betas` are given in PyTorch's convention (the weight of the OLD moment: 0.9, 0.999). The
    paper writes m_t = (1 − β1')·m + (β1'/s_k)·g with β1' the weight of the NEW gradient; here β1' = 1 − β1
    (and β2' = 1 − β2), which is the update above. With s_k = 1 and ω_k = 1 it is exactly
    `torch.optim.AdamW` applied to the normalised gradient ∇L / ‖∇L‖ (the tests check this).

    Bias correction: the AdamW one, 1 − β^t with t the number of steps this parameter has taken, whatever the
    tasks. Why: a task k is drawn with probability s_k and then adds (1 − β)/s_k · g_k, so in expectation every
    task feeds its moment (1 − β)·g_k per step, the same rate as one-task Adam; from zero moments the expected
    accumulated mass after t steps is (1 − β^t) of the steady state for every task at once, which is what
    AdamW's correction divides out. (Dividing by the actually accumulated task coefficients instead would turn
    the sum over tasks of the moments into a mean and shrink the step by √K for K tasks.)

    Note (1 − β)/s_k may exceed 1 for a rare task (β1 = 0.9, s_k = 0.05: 2.0); that is the method, not a bug.

    grad_norm_reduction: how the global norm is formed when torch.distributed is initialised:
      "local": the norm of this process's gradients. Right for a single process, and for data parallelism
               where every rank holds the full, already averaged gradient (DeepSpeed ZeRO stage 0, DDP):
               summing over ranks there would count every gradient world_size times.
      "sum":   squares summed locally, all_reduce(SUM), then the square root. Right under DeepSpeed ZeRO
               stages 1-3, where each rank's optimizer holds only its partition of the flat gradient.
    Caveat under DeepSpeed ZeRO 1/2: DeepSpeed calls `step()` once per parameter group, showing only that
    group, and ZeRO-3 once per sub-group. The global norm is then only global if the optimizer has ONE
    parameter group (and, for ZeRO-3, fewer parameters than `sub_group_size`): `step()` refuses to run
    when it sees fewer groups than it was built with. Pass `grad_norm=` to `set_task` to supply a norm
    computed elsewhere instead. DeepSpeed's `gradient_clipping` must be off (0): normalisation replaces it.

    A non-finite global norm skips the step: nothing changes and `last_step_skipped` is True, so the training
    loop can count it as a skipped step instead of the run dying.

    Parameters without a gradient (None) are skipped, as AdamW skips them: their moments do not decay and
    their step count does not advance. DeepSpeed hands zero gradients for idle parameters instead, which do
    decay the moments; give unused branches a zero-weighted loss term when the two must agree.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 grad_norm_reduction: str = "local"):
        if not lr >= 0.0:
            raise ValueError(f"TBGNAdamW: lr must be >= 0, got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"TBGNAdamW: betas must be two numbers in [0, 1) (PyTorch convention: the weight of "
                             f"the old moment, e.g. (0.9, 0.999)), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"TBGNAdamW: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"TBGNAdamW: weight_decay must be >= 0, got {weight_decay}")
        if grad_norm_reduction not in REDUCTIONS:
            raise ValueError(f"TBGNAdamW: grad_norm_reduction must be one of {REDUCTIONS}, got {grad_norm_reduction!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.grad_norm_reduction = grad_norm_reduction
        self._num_groups = len(self.param_groups)
        self.task: str | int | None = None
        self.sampling_ratio: float | None = None
        self.weight: float | None = None
        self._given_norm: float | None = None
        self.last_grad_norm: float | None = None  # the norm the last step divided by, for logging
        self.last_step_skipped = False  # the last step found a non-finite norm and changed nothing

    def set_task(self, task: str | int, sampling_ratio: float, weight: float = 1.0,
                 grad_norm: float | Tensor | None = None) -> None:
        """The task of the coming step(s): its name or index (kept for logging), its normalised sampling ratio
        s_k in (0, 1] and its weight ω_k >= 0. `grad_norm`: a global gradient norm computed by the caller, used
        by the next `step()` instead of computing one."""
        sampling_ratio, weight = float(sampling_ratio), float(weight)
        if not 0.0 < sampling_ratio <= 1.0:
            raise ValueError(f"TBGNAdamW.set_task({task!r}): sampling_ratio must be in (0, 1] (a normalised "
                             f"probability), got {sampling_ratio}")
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"TBGNAdamW.set_task({task!r}): weight must be finite and >= 0, got {weight}")
        self.task, self.sampling_ratio, self.weight = task, sampling_ratio, weight
        self._given_norm = None if grad_norm is None else float(grad_norm)

    def _params_with_grad(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def global_grad_norm(self) -> Tensor:
        """‖∇L‖ over every parameter of every group, reduced over ranks as `grad_norm_reduction` says."""
        grads = [p.grad for p in self._params_with_grad()]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("TBGNAdamW does not support sparse gradients")
        device = grads[0].device if grads else self.param_groups[0]["params"][0].device
        squares = torch.zeros((), dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        for g in grads:
            squares += g.detach().to(squares.dtype).pow(2).sum()
        if self.grad_norm_reduction == "sum" and dist.is_available() and dist.is_initialized():
            dist.all_reduce(squares, op=dist.ReduceOp.SUM)
        return squares.sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.sampling_ratio is None:
            raise RuntimeError("TBGNAdamW.step(): call set_task(task, sampling_ratio, weight) first")
        if self._given_norm is None and len(self.param_groups) != self._num_groups:
            raise RuntimeError(
                f"TBGNAdamW.step() sees {len(self.param_groups)} of its {self._num_groups} parameter groups (DeepSpeed "
                "ZeRO steps one group at a time), so it cannot form the global gradient norm: build it with one "
                "parameter group, or pass grad_norm= to set_task")
        norm = self._given_norm if self._given_norm is not None else float(self.global_grad_norm())
        self._given_norm = None  # a given norm is for one step only
        self.last_grad_norm = norm
        self.last_step_skipped = not math.isfinite(norm)
        if self.last_step_skipped:  # the training loop's skip path: no weight, moment or step count moves
            return loss
        # g = scale * grad; a zero gradient stays zero (the moments just decay)
        scale = self.weight / norm if norm > 0 else 0.0
        s = self.sampling_ratio

        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"].item())
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=(1.0 - beta1) * scale / s)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=(1.0 - beta2) * scale * scale / s)
                p.mul_(1.0 - lr * weight_decay)
                bias_correction1 = 1.0 - beta1 ** t
                bias_correction2 = 1.0 - beta2 ** t
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return loss
