"""Nash-MTL: Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task
Learning as a Bargaining Game", ICML 2022.

The update is d = Σ α_i g_i with α > 0 solving Gᵀ G α = 1/α elementwise (Algorithm 1),
i.e. K α = 1/α in Gram space; c = α. (‖d‖² = αᵀKα = T: the bargaining solution fixes
the update's norm, not the loss scale.)

The authors solve it with cvxpy, by a sequence of convex linear approximations (CCP,
20 iterations), on K normalised by its Frobenius norm n; but their constraint multiplies α
by n again (log(α_i·n) + log(((K/n) α)_i) >= 0, active at the solution), so n cancels and
their weights solve the paper's equation for K itself: measured against the reference
implementation on the same Gram matrix, the two sets of weights agree to 1.000003 (its CCP
tolerance). (An earlier version of this comment claimed a factor √n between them.) Here
the equation itself is solved: K α = 1/α is the stationarity condition of the strictly
convex f(α) = ½ αᵀKα - Σ log α_i, minimised by damped Newton (backtracking, α kept
positive) in float64 until the Newton decrement is at rounding level. The equation is
invariant under diagonal scaling (α solves K α = 1/α iff D^½ α solves the same equation
for D^-½ K D^-½), so it is solved on the unit-diagonal (cosine) matrix, which makes the
solve independent of the tasks' gradient scales. A solution exists iff 0 is not in the
convex hull of the gradients (otherwise f is unbounded below: a Pareto-stationary point,
where the paper's equation has no solution); a ridge of ``ridge`` on the cosine matrix's
diagonal (K_ii·ridge on K's) keeps one in existence and perturbs a regular solution by
about that relative amount.

Tasks with a zero gradient (K_ii = 0: no α_i satisfies 0 = 1/α_i) are, like absent
tasks, left out and get 0. Defaults: ``ridge`` 1e-10 (no paper counterpart), Newton
``max_iter`` 100; the authors' ``update_weights_every`` (1) and ``max_norm`` clipping
(1.0) belong to the trainer (compute every step; ``optim.grad_clip``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainer.balancers.base import Balancer, expand, restrict
from trainer.balancers.registry import register_balancer

_BACKTRACK_LIMIT = 60  # halvings of the Newton step; 2^-60 is below float64 resolution


@register_balancer("nash_mtl")
class NashMTL(Balancer):
    def __init__(self, task_names: Sequence[str], *, ridge: float = 1e-10, max_iter: int = 100) -> None:
        super().__init__(task_names)
        if ridge < 0 or max_iter < 1:
            raise ValueError(f"nash_mtl: need ridge >= 0 and max_iter >= 1, got {ridge}, {max_iter}")
        self.ridge, self.max_iter = ridge, max_iter

    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        usable = present & (gram.diagonal() > 0)
        if not usable.any():
            return torch.zeros(self.num_tasks, dtype=torch.float64)
        index, sub = restrict(gram, usable)
        inv_norms = sub.diagonal().rsqrt()
        cosine = sub * inv_norms[:, None] * inv_norms[None, :]
        cosine += self.ridge * torch.eye(len(index), dtype=torch.float64)
        alpha = bargaining_solution(cosine, self.max_iter) * inv_norms
        return expand(alpha, index, self.num_tasks)


def bargaining_solution(gram: Tensor, max_iter: int) -> Tensor:
    """α > 0 with K α = 1/α, by damped Newton on ½ αᵀKα - Σ log α (K_ii > 0)."""
    def objective(a: Tensor) -> float:
        return float(0.5 * a @ gram @ a - torch.log(a).sum())

    # Exact when the gradients are orthogonal; a scale-appropriate start otherwise.
    alpha = gram.diagonal().rsqrt()
    for _ in range(max_iter):
        grad = gram @ alpha - 1 / alpha
        hessian = gram + torch.diag(alpha**-2)
        step = torch.linalg.solve(hessian, grad)
        decrement = float(grad @ step)  # squared Newton decrement: f - f* ≈ decrement / 2
        if decrement <= 1e-24:
            break
        # Largest step keeping α > 0, then Armijo backtracking.
        shrinking = step > 0
        t = min(1.0, 0.99 * float((alpha[shrinking] / step[shrinking]).min())) if shrinking.any() else 1.0
        value = objective(alpha)
        for _ in range(_BACKTRACK_LIMIT):
            if objective(alpha - t * step) <= value - 0.25 * t * decrement:
                break
            t *= 0.5
        alpha = alpha - t * step
    return alpha
