"""PCGrad: Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020, Algorithm 1.

For each task i: g_i^PC = g_i; for each other task j in random order, if g_i^PC · g_j < 0,
g_i^PC -= (g_i^PC · g_j / ‖g_j‖²) g_j. The update is Σ_i g_i^PC (the paper's sum).

In Gram space, exactly: every g_i^PC stays a linear combination a_iᵀ G of the task
gradients, with g_i^PC · g_j = (a_iᵀ K)_j, so each projection is a_i -= ((a_iᵀK)_j / K_jj) e_j,
and c = Σ_i a_i. Floating-point-wise the sign tests see dots computed from K instead of
from the vectors; they differ only for |dot| at rounding level.

The random orders (one permutation of the other present tasks for every i, drawn afresh
at every step as in the authors' code) come from a CPU generator seeded with
(``seed``, step) — ``step`` is in the balancer state — so all ranks draw the same orders
and a resumed run draws the ones it would have drawn. Absent tasks take part in no
projection (their gradient is zero anyway) and get 0. Σ c is not normalised (Σ c = T
when no pair conflicts).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainer.balancers.base import Balancer, expand, restrict
from trainer.balancers.registry import register_balancer


@register_balancer("pcgrad")
class PCGrad(Balancer):
    def __init__(self, task_names: Sequence[str], *, seed: int = 0) -> None:
        super().__init__(task_names)
        self.seed = seed

    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        index, sub = restrict(gram, present)
        orders = projection_orders(len(index), seed=self.seed, step=int(self.state["step"]))
        return expand(projected_sum_coefficients(sub, orders), index, self.num_tasks)


def projection_orders(count: int, *, seed: int, step: int) -> list[list[int]]:
    """For each task i of ``count``, the order in which the others are projected out."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
    orders = []
    for i in range(count):
        others = [j for j in range(count) if j != i]
        orders.append([others[k] for k in torch.randperm(count - 1, generator=generator).tolist()])
    return orders


def projected_sum_coefficients(gram: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """c with Σ_i g_i^PC = Σ_j c_j g_j, projecting in ``orders``, from the Gram matrix only."""
    count = gram.shape[0]
    combos = torch.eye(count, dtype=torch.float64)  # row i: g_i^PC in the basis of the g_j
    for i, order in enumerate(orders):
        for j in order:
            dot = combos[i] @ gram[:, j]
            if dot < 0:  # a zero gradient (K_jj = 0) has zero dots: never projected on
                combos[i, j] -= dot / gram[j, j]
    return combos.sum(dim=0)
