"""GradNorm: Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, Algorithm 1.

Learnable weights w_i (init 1); the trunk coefficient of a step is w_i(t). With
G_i = w_i ‖g_i‖ (g_i: the task gradient w.r.t. the shared representation W — here the
shared features or parameters the Gram matrix is of, so ‖g_i‖ = sqrt(K_ii)),
Ḡ = mean_i G_i, L̃_i = L_i(t)/L_i(0), r_i = L̃_i / mean_j L̃_j, the weights descend
    L_grad = Σ_i | G_i - Ḡ r_i^α |,     the target Ḡ r_i^α held constant,
whose gradient is analytic: ∂L_grad/∂w_i = ‖g_i‖ sign(G_i - Ḡ r_i^α). One step of the
balancer's own Adam on it per training step, then w is renormalised to Σ_i w_i = T
(Algorithm 1). Coefficients use w(t), before the update, as in Algorithm 1.

Absent tasks: coefficient 0; left out of Ḡ, of mean L̃ and of the step; the present
weights are renormalised to keep their sum (so Σ w stays T and Σ c = their share of it,
rescaled to the number of present tasks). L_i(0) is the task's global loss at the first
step where it was present.

Defaults: α = 1.5 (the paper's NYUv2 setting); Adam lr 0.025 — the paper gives no
separate rate for w; Adam makes the step independent of the gradient scale, and 0.025
is the rate the Nash-MTL/FAMO benchmark code uses for loss-weight parameters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainer.balancers.adam import MaskedAdam
from trainer.balancers.base import Balancer
from trainer.balancers.registry import register_balancer

# Weights stay positive: a coefficient must not flip the sign of a task's gradient.
_MIN_WEIGHT = 1e-6


@register_balancer("gradnorm")
class GradNorm(Balancer):
    def __init__(self, task_names: Sequence[str], *, alpha: float = 1.5, lr: float = 0.025,
                 betas: Sequence[float] = (0.9, 0.999)) -> None:
        super().__init__(task_names)
        if alpha < 0:
            raise ValueError(f"gradnorm: alpha must be >= 0, got {alpha}")
        self.alpha = alpha
        self.adam = MaskedAdam(lr=lr, betas=betas)
        count = self.num_tasks
        self.state.update(
            weights=torch.ones(count, dtype=torch.float64),
            initial_loss=torch.zeros(count, dtype=torch.float64),
            has_initial=torch.zeros(count, dtype=torch.bool),
            **self.adam.initial_state(count),
        )

    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        s = self.state
        weights = s["weights"]
        total = torch.where(present, weights, 0.0).sum()
        coef = weights * present.sum() / total

        first = present & ~s["has_initial"]
        s["initial_loss"] = torch.where(first, losses, s["initial_loss"])
        s["has_initial"] = s["has_initial"] | first

        norms = gram.diagonal().clamp(min=0).sqrt()
        scaled_norms = weights * norms
        mean_norm = scaled_norms[present].mean()
        tiny = torch.finfo(torch.float64).tiny
        inverse_rate = losses / s["initial_loss"].clamp(min=tiny)
        relative = inverse_rate / inverse_rate[present].mean().clamp(min=tiny)
        # r^α needs r >= 0: a negative loss ratio has no meaning for GradNorm.
        target = mean_norm * relative.clamp(min=0) ** self.alpha
        grad = norms * torch.sign(scaled_norms - target)
        self.adam.step(weights, grad, s, mask=present)
        weights.clamp_(min=_MIN_WEIGHT)
        weights[present] *= total / weights[present].sum()
        return coef

    def monitor(self) -> dict[str, float]:
        return {f"balancer/weight/{t}": float(v) for t, v in zip(self.tasks, self.state["weights"])}
