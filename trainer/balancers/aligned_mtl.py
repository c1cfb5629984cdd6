"""Aligned-MTL: Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment
for Multi-Task Learning", CVPR 2023, Algorithm 1.

The gradient matrix is aligned to its closest (Procrustes) matrix with orthogonal
components of equal magnitude: with the eigen-decomposition of the Gram matrix
K = G Gᵀ = V Λ Vᵀ (rank R), B = σ V_R Λ_R^{-1/2} V_Rᵀ with σ = √λ_min (the smallest
nonzero eigenvalue; ``scale`` "min", the paper's choice) and the aligned gradients Ĝ = Bᵀ G
have Gram B K B = σ² V_R V_Rᵀ: all nonzero singular values equal σ. The update is
Σ_t w_t ĝ_t with the pre-defined task weights w (1 each, the authors' code sums), so
c = B w — already Gram-only, exactly as the authors compute it. The rank uses their
tolerance λ_max · T · ε(float32). ``scale`` "median" and "rmse" are the authors' other
options (σ² = median or mean of the nonzero eigenvalues). Absent tasks are left out of
the decomposition and get 0; a zero gradient falls in the null space and gets 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainer.balancers.base import Balancer, expand, restrict
from trainer.balancers.registry import register_balancer

_SCALES = ("min", "median", "rmse")


@register_balancer("aligned_mtl")
class AlignedMTL(Balancer):
    def __init__(self, task_names: Sequence[str], *, scale: str = "min") -> None:
        super().__init__(task_names)
        if scale not in _SCALES:
            raise ValueError(f"aligned_mtl: scale must be one of {_SCALES}, got {scale!r}")
        self.scale = scale

    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        index, sub = restrict(gram, present)
        return expand(alignment(sub, self.scale).sum(dim=1), index, self.num_tasks)


def alignment(gram: Tensor, scale: str) -> Tensor:
    """B = σ V_R Λ_R^{-1/2} V_Rᵀ (symmetric; zero when all gradients are zero)."""
    eigenvalues, basis = torch.linalg.eigh(gram)
    top = float(eigenvalues.max())
    keep = eigenvalues > top * gram.shape[0] * torch.finfo(torch.float32).eps
    if top <= 0 or not keep.any():
        return torch.zeros_like(gram)
    values, vectors = eigenvalues[keep], basis[:, keep]
    sigma_sq = {"min": values.min(), "median": values.median(), "rmse": values.mean()}[scale]
    return (vectors * (sigma_sq / values).sqrt()) @ vectors.T
