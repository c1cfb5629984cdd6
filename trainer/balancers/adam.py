"""Adam on a balancer's own small parameter vector (log-variances, GradNorm weights,
FAMO logits), stepping only the coordinates of tasks that were present.

Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, Algorithm 1, with
``weight_decay`` added to the gradient as ``torch.optim.Adam`` does (L2, not decoupled).
Step counts are per coordinate: a task absent from a step neither decays its moments nor
moves, as if its parameter had no gradient that step (``torch.optim.SparseAdam``'s
semantics). The moments live in the balancer's state dict, under ``<prefix>exp_avg``,
``<prefix>exp_avg_sq`` and ``<prefix>steps``.
"""
from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import torch
from torch import Tensor


class MaskedAdam:
    def __init__(self, *, lr: float, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, prefix: str = "adam_") -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Adam: need lr > 0, eps > 0, weight_decay >= 0, betas in [0, 1); "
                             f"got lr={lr}, eps={eps}, weight_decay={weight_decay}, betas={betas}")
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.prefix = prefix

    def initial_state(self, size: int) -> dict[str, Tensor]:
        return {f"{self.prefix}{k}": torch.zeros(size, dtype=torch.float64) for k in ("exp_avg", "exp_avg_sq", "steps")}

    def step(self, param: Tensor, grad: Tensor, state: MutableMapping[str, Tensor | int], *, mask: Tensor) -> None:
        """Update ``param`` (float64, in place) at ``mask`` from ``grad``."""
        exp_avg, exp_avg_sq, steps = (state[f"{self.prefix}{k}"] for k in ("exp_avg", "exp_avg_sq", "steps"))
        g = grad + self.weight_decay * param
        steps[mask] += 1
        exp_avg[mask] = self.beta1 * exp_avg[mask] + (1 - self.beta1) * g[mask]
        exp_avg_sq[mask] = self.beta2 * exp_avg_sq[mask] + (1 - self.beta2) * g[mask] ** 2
        m_hat = exp_avg[mask] / (1 - self.beta1 ** steps[mask])
        v_hat = exp_avg_sq[mask] / (1 - self.beta2 ** steps[mask])
        param[mask] -= self.lr * m_hat / (v_hat.sqrt() + self.eps)
