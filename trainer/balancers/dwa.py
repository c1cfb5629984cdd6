"""Dynamic Weight Average: Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019, the DWA weighting rule:
    λ_k(t) = K exp(w_k(t-1)/τ) / Σ_i exp(w_i(t-1)/τ),   w_k(t-1) = L_k(t-1) / L_k(t-2),
with L_k(t) the task's average loss over epoch t and λ = 1 for the first two epochs.

Epochs become tumbling windows of ``window`` steps: the weights are constant within a
window and computed from the mean global losses of the two windows before it. A window's
mean of a task is over the steps where the task was present; a task missing from either
of the two windows has no ratio and gets w = 1 (the value of "no change"). Absent tasks
get 0 and the softmax runs over the present ones, so Σ c = number of present tasks.

Defaults: τ = 2 (paper). ``window`` = 25 steps — the paper's unit is an epoch; 25 is the
iteration window of the Nash-MTL benchmark implementation of DWA.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainer.balancers.base import Balancer
from trainer.balancers.registry import register_balancer


@register_balancer("dwa")
class DynamicWeightAverage(Balancer):
    needs_gram = False

    def __init__(self, task_names: Sequence[str], *, temperature: float = 2.0, window: int = 25) -> None:
        super().__init__(task_names)
        if temperature <= 0 or window < 1:
            raise ValueError(f"dwa: need temperature > 0 and window >= 1, got {temperature}, {window}")
        self.temperature, self.window = temperature, window
        count = self.num_tasks
        self.state.update(
            window_sum=torch.zeros(count, dtype=torch.float64),  # loss sums of the running window
            window_steps=torch.zeros(count, dtype=torch.float64),  # steps each task was present in it
            last_mean=torch.zeros(count, dtype=torch.float64),  # L(t-1), where last_valid
            last_valid=torch.zeros(count, dtype=torch.bool),
            prev_mean=torch.zeros(count, dtype=torch.float64),  # L(t-2), where prev_valid
            prev_valid=torch.zeros(count, dtype=torch.bool),
            ratio=torch.ones(count, dtype=torch.float64),  # w(t-1) for the running window
        )

    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        state = self.state
        if state["step"] > 0 and state["step"] % self.window == 0:
            self._close_window()
        logits = torch.where(present, state["ratio"] / self.temperature, -torch.inf)
        coef = present.sum() * torch.softmax(logits, dim=0)
        state["window_sum"] += torch.where(present, losses, 0.0)
        state["window_steps"] += present.double()
        return coef

    def _close_window(self) -> None:
        s = self.state
        s["prev_mean"], s["prev_valid"] = s["last_mean"], s["last_valid"]
        s["last_valid"] = s["window_steps"] > 0
        s["last_mean"] = s["window_sum"] / s["window_steps"].clamp(min=1)
        usable = s["last_valid"] & s["prev_valid"] & (s["prev_mean"] > 0)
        s["ratio"] = torch.where(usable, s["last_mean"] / s["prev_mean"].clamp(min=torch.finfo(torch.float64).tiny), 1.0)
        s["window_sum"] = torch.zeros_like(s["window_sum"])
        s["window_steps"] = torch.zeros_like(s["window_steps"])

    def monitor(self) -> dict[str, float]:
        return {f"balancer/loss_ratio/{t}": float(v) for t, v in zip(self.tasks, self.state["ratio"])}
