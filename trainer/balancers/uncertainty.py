"""Uncertainty weighting: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty
to Weigh Losses for Scene Geometry and Semantics", CVPR 2018.

Their multi-task objective, in its regression form for every task (s_i = log σ_i²), is
    Σ_i ½ exp(-s_i) L_i + ½ s_i,
so the trunk coefficient is c_i = ½ exp(-s_i) (½ at initialisation, s = 0).

The paper learns s with the network's optimiser, from the rank-local loss. Here s is
learnt by the balancer's own Adam step on the same objective, from the *global* mean
losses, so every rank holds the same s: ∂/∂s_i = ½ (1 - exp(-s_i) L_i). Its fixed point is
s_i = log E[L_i], i.e. c_i L_i = ½ (with small steps, exp(s) is an exponential moving
average of the loss). Coefficients of a step use s before that step's update, as an
optimiser step would. Absent tasks: coefficient 0, s unchanged (in the classic form their
zero loss would pull s_i down every step: the poisoning the issue describes).

Defaults: Adam, lr 0.025 — the paper gives none; 0.025 is what the Nash-MTL and FAMO
benchmark code uses for the log-variances (``--method-params-lr``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainer.balancers.adam import MaskedAdam
from trainer.balancers.base import Balancer
from trainer.balancers.registry import register_balancer


@register_balancer("uncertainty")
class Uncertainty(Balancer):
    needs_gram = False

    def __init__(self, task_names: Sequence[str], *, lr: float = 0.025, betas: Sequence[float] = (0.9, 0.999)) -> None:
        super().__init__(task_names)
        self.adam = MaskedAdam(lr=lr, betas=betas)
        self.state["log_var"] = torch.zeros(self.num_tasks, dtype=torch.float64)
        self.state.update(self.adam.initial_state(self.num_tasks))

    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        log_var = self.state["log_var"]
        coef = 0.5 * torch.exp(-log_var)
        grad = 0.5 * (1 - torch.exp(-log_var) * losses)
        self.adam.step(log_var, grad, self.state, mask=present)
        return coef

    def monitor(self) -> dict[str, float]:
        return {f"balancer/log_var/{t}": float(v) for t, v in zip(self.tasks, self.state["log_var"])}
