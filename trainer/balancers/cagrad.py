"""CAGrad: Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task
Learning", NeurIPS 2021.

The update d maximises the worst task improvement min_i g_i·d within the ball
‖d - g0‖ ≤ c‖g0‖ around the average gradient g0 = (1/T) Σ g_i (the primal problem). By
its dual (Lagrangian in d, then λ eliminated) d = g0 + (√φ / ‖g_w‖) g_w with φ = c²‖g0‖², g_w = Σ w_i g_i and
    w = argmin_{w ∈ Δ} g_wᵀ g0 + √φ ‖g_w‖.
As in the authors' code the result is divided by (1 + c²). So d is a linear combination
of the g_i: c_i = (1/T + (√φ / ‖g_w‖) w_i) / (1 + c²), and everything is in Gram space:
g_w·g0 = wᵀ K 1/T, ‖g_w‖² = wᵀ K w, ‖g0‖² = mean(K). c = 0 gives g0 (c_i = 1/T).

The authors solve the dual with scipy's SLSQP; here it is solved exactly for small T on
every face of the simplex (:mod:`trainer.balancers.faces`): on support S, with
p = K_S⁻¹ 1 and q = K_S⁻¹ a (a = K 1/T), stationarity is w ∝ μ p - q where
μ = (1ᵀq + √disc) / 1ᵀp, disc = (1ᵀq)² - 1ᵀp (aᵀq - φ). When the minimiser has g_w = 0
(0 in the hull and φ large) d = g0, the limit of the authors' ε-regularised formula.
Absent tasks are left out: T above is the number of present tasks. Σ c ≈ 1 (the
paper's mean-gradient scale; the authors' benchmark code multiplies the update by T).

Default: c = 0.4 (the paper's and code's setting for NYUv2 and Cityscapes).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from trainer.balancers.base import Balancer, expand, restrict
from trainer.balancers.faces import face_blocks, minimise_over_faces, quadratic_form, solve_faces
from trainer.balancers.registry import register_balancer


@register_balancer("cagrad")
class CAGrad(Balancer):
    def __init__(self, task_names: Sequence[str], *, c: float = 0.4) -> None:
        super().__init__(task_names)
        if c < 0:
            raise ValueError(f"cagrad: c must be >= 0, got {c}")
        self.c = c

    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        index, sub = restrict(gram, present)
        mean = torch.full((len(index),), 1.0 / len(index), dtype=torch.float64)
        to_mean = sub @ mean  # g_i · g0
        radius = self.c * math.sqrt(max(float(mean @ to_mean), 0.0))  # √φ = c ‖g0‖
        coef = mean.clone()
        if radius > 0:
            w = conflict_averse_weights(sub, to_mean, radius)
            gw_norm = math.sqrt(max(float(w @ sub @ w), 0.0))
            if gw_norm > 0:
                coef += (radius / gw_norm) * w
        return expand(coef / (1 + self.c**2), index, self.num_tasks)


def conflict_averse_weights(gram: Tensor, to_mean: Tensor, radius: float) -> Tensor:
    """argmin_{w ∈ Δ} wᵀ a + r √(wᵀ K w), with a = ``to_mean`` and r = ``radius``."""
    matrix, a = gram.numpy(), to_mean.numpy()

    def solve_face(supports: np.ndarray) -> np.ndarray:
        a_s = a[supports]
        solution = solve_faces(face_blocks(matrix, supports), np.stack([np.ones_like(a_s), a_s], axis=-1))
        p, q = solution[..., 0], solution[..., 1]
        sum_p, sum_q = p.sum(axis=1), q.sum(axis=1)
        disc = sum_q**2 - sum_p * ((a_s * q).sum(axis=1) - radius**2)
        root = np.sqrt(np.clip(disc, 0.0, None))
        w = ((sum_q + root) / sum_p)[:, None] * p - q  # μ p - q
        return np.where(((disc > 0) & (sum_p > 0))[:, None], w / root[:, None], np.nan)

    def objective(w: np.ndarray) -> np.ndarray:
        return w @ a + radius * np.sqrt(np.clip(quadratic_form(matrix, w), 0.0, None))

    return minimise_over_faces(len(matrix), solve_face, objective)
