"""MGDA-UB: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018.

The common descent direction is the min-norm point of the convex hull of the task
gradients: α* = argmin_{α ∈ Δ} ‖Σ α_i g_i‖² = argmin αᵀ K α, and c = α*
(Σ c = 1, as in the paper: the update is θ ← θ - η Σ α_i ∇L_i). The upper-bound variant
(Section 3.3) takes g_i w.r.t. the shared representation z — exactly what the
``representation`` mode of :mod:`trainer.grad_stats` gives; in ``parameters`` mode this
is plain MGDA.

Solvers (``solver``): ``exact`` — the KKT system [[K_S, 1], [1ᵀ, 0]] [α_S; μ] = [0; 1]
on every face of the simplex (:mod:`trainer.balancers.faces`), exact for any T up to
``exact_max_tasks``; ``frank_wolfe`` — the paper's Algorithm 2 (with Algorithm 1's
closed-form line search), in Gram space: θ·θ = αᵀKα, θ·g_t = (Kα)_t, g_t·g_t = K_tt.
``auto`` = exact up to ``exact_max_tasks`` present tasks, Frank-Wolfe beyond.
``normalization``: gradients divided by 1 (``none``, the paper), their norm (``l2``), the
loss (``loss``) or both (``loss+``) before the solve, as in the authors' code; the
coefficients are mapped back (c_i = α_i / scale_i) so they apply to the raw gradients.
Absent tasks are left out of the simplex.

Defaults: Frank-Wolfe max_iter 250, tol 1e-5 (MAX_ITER, STOP_CRIT of the authors'
MinNormSolver); normalization ``none``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from trainer.balancers.base import Balancer, expand, restrict
from trainer.balancers.faces import face_blocks, minimise_over_faces, quadratic_form, solve_faces
from trainer.balancers.registry import register_balancer

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
_SOLVERS = ("auto", "exact", "frank_wolfe")


@register_balancer("mgda")
class MGDA(Balancer):
    def __init__(self, task_names: Sequence[str], *, normalization: str = "none", solver: str = "auto",
                 max_iter: int = 250, tol: float = 1e-5, exact_max_tasks: int = 10) -> None:
        super().__init__(task_names)
        if normalization not in _NORMALIZATIONS or solver not in _SOLVERS:
            raise ValueError(f"mgda: normalization in {_NORMALIZATIONS}, solver in {_SOLVERS}; "
                             f"got {normalization!r}, {solver!r}")
        self.normalization, self.solver = normalization, solver
        self.max_iter, self.tol, self.exact_max_tasks = max_iter, tol, exact_max_tasks

    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        index, sub = restrict(gram, present)
        scale = self._scales(sub, losses[index])
        normalised = sub / (scale[:, None] * scale[None, :])
        exact = self.solver == "exact" or (self.solver == "auto" and len(index) <= self.exact_max_tasks)
        alpha = min_norm_exact(normalised) if exact else min_norm_frank_wolfe(normalised, self.max_iter, self.tol)
        return expand(alpha / scale, index, self.num_tasks)

    def _scales(self, gram: Tensor, losses: Tensor) -> Tensor:
        norms = gram.diagonal().clamp(min=0).sqrt()
        scale = {"none": torch.ones_like(losses), "l2": norms, "loss": losses, "loss+": losses * norms}[self.normalization]
        # A zero scale means a zero gradient (or loss): nothing to normalise, keep it as is.
        return torch.where(scale > 0, scale, 1.0)


def min_norm_exact(gram: Tensor) -> Tensor:
    """argmin_{α ∈ Δ} αᵀ K α, exactly, by the KKT system on every face."""
    matrix = gram.numpy()

    def solve_face(supports: np.ndarray) -> np.ndarray:
        count, k = supports.shape
        kkt = np.zeros((count, k + 1, k + 1))
        kkt[:, :k, :k] = face_blocks(matrix, supports)
        kkt[:, :k, k] = 1.0
        kkt[:, k, :k] = 1.0
        rhs = np.zeros((count, k + 1, 1))
        rhs[:, k, 0] = 1.0
        return solve_faces(kkt, rhs)[:, :k, 0]

    return minimise_over_faces(len(matrix), solve_face, lambda w: quadratic_form(matrix, w))


def min_norm_frank_wolfe(gram: Tensor, max_iter: int, tol: float) -> Tensor:
    """Sener & Koltun, Algorithm 2: Frank-Wolfe from the barycentre, exact line search."""
    count = gram.shape[0]
    alpha = torch.full((count,), 1.0 / count, dtype=torch.float64)
    for _ in range(max_iter):
        k_alpha = gram @ alpha
        t = int(torch.argmin(k_alpha))
        gamma = _segment_min_norm(float(alpha @ k_alpha), float(k_alpha[t]), float(gram[t, t]))
        alpha = (1 - gamma) * alpha
        alpha[t] += gamma
        if gamma < tol:
            break
    return alpha


def _segment_min_norm(aa: float, ab: float, bb: float) -> float:
    """Sener & Koltun, Algorithm 1: γ minimising ‖(1-γ) a + γ b‖² over [0, 1], given a·a,
    a·b and b·b."""
    if ab >= aa:
        return 0.0
    if ab >= bb:
        return 1.0
    return (aa - ab) / (aa - 2 * ab + bb)
