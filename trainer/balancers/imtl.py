"""IMTL-G: Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
Learning", ICLR 2021: the gradient-balance part, IMTL-G.

The aggregated gradient g = Σ α_t g_t must have equal projections on every task's unit
gradient u_t = g_t/‖g_t‖ (g·(u_1 - u_t) = 0), with Σ α_t = 1. The paper's closed form:
    α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹,  α_1 = 1 - Σ_{t≥2} α_t,
    U = [u_1 - u_t]_{t≥2},  D = [g_1 - g_t]_{t≥2}.
All of it is in Gram space: g_i·u_j = K_ij / √K_jj. As in the paper, the gradients are
those of the shared representation z (``representation`` mode). c = α (Σ c = 1).

A singular D Uᵀ (e.g. two identical task gradients) has many solutions; the
Moore-Penrose pseudo-inverse picks the least-squares one (the authors' code adds 1e-8·I
instead). Tasks with a zero gradient have no direction u_t: like absent tasks, they are
left out of the solve and get 0. No hyper-parameters.
"""
from __future__ import annotations

import torch
from torch import Tensor

from trainer.balancers.base import Balancer, expand, restrict
from trainer.balancers.registry import register_balancer


@register_balancer("imtl_g")
class IMTLG(Balancer):
    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        usable = present & (gram.diagonal() > 0)
        if not usable.any():
            return torch.zeros(self.num_tasks, dtype=torch.float64)
        index, sub = restrict(gram, usable)
        proj = sub / sub.diagonal().sqrt()[None, :]  # proj[i, j] = g_i · u_j
        first = proj[0, 0] - proj[0, 1:]  # g_1 Uᵀ
        # (D Uᵀ)_ij = (g_1 - g_i)·(u_1 - u_j)
        d_ut = proj[0, 0] - proj[0, 1:][None, :] - proj[1:, 0][:, None] + proj[1:, 1:]
        rest = first @ torch.linalg.pinv(d_ut)
        alpha = torch.cat([(1 - rest.sum()).reshape(1), rest])
        return expand(alpha, index, self.num_tasks)
