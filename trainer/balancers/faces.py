"""Exact minimisation over the probability simplex for small T, by enumerating its faces.

A convex function of the task weights w ∈ Δ_m attains its minimum in the relative
interior of some face (support S ⊆ {1..m}); there, the stationarity conditions restricted
to S are a small linear system. Solving it on all 2^m - 1 faces at once (batched by face
size), keeping the candidates and scoring each with the true objective gives the exact
minimiser. Every candidate is first made feasible (clamped at 0, renormalised), so a
singular or ill-conditioned face can only contribute a feasible, honestly scored point —
never a value below the true minimum. Used by MGDA (exact min-norm point) and CAGrad.
Cost: 2^m candidates; meant for m up to ~10 tasks.

The arithmetic is numpy float64: its batched LAPACK loop and tiny products run serially,
whereas torch's batched solves and small GEMMs enter the OpenMP pool, whose waits cost
milliseconds per call on a busy host (measured: 7 ms vs 7 µs for the 3-task faces of T=5).
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import numpy as np
import torch
from torch import Tensor

FaceSolver = Callable[[np.ndarray], np.ndarray]  # supports [S, k] -> weights on them [S, k], NaN = none
Objective = Callable[[np.ndarray], np.ndarray]  # candidates [N, m] -> values [N]


def minimise_over_faces(size: int, solve_face: FaceSolver, objective: Objective) -> Tensor:
    """The minimiser (float64 [size]) of ``objective`` over the simplex, from the vertices
    and the solutions ``solve_face`` gives on every face of dimension >= 1."""
    candidates = [np.eye(size)]  # vertices: always feasible
    for k in range(2, size + 1):
        supports = np.array(list(combinations(range(size), k)))
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN rows are dropped below
            weights = np.clip(solve_face(supports), 0.0, None)
            total = weights.sum(axis=1, keepdims=True)
            usable = np.isfinite(weights).all(axis=1) & (total[:, 0] > 0)
            full = np.zeros((len(supports), size))
            np.put_along_axis(full, supports, weights / total, axis=1)
        candidates.append(full[usable])
    stacked = np.concatenate(candidates)
    return torch.from_numpy(stacked[np.argmin(objective(stacked))].copy())  # first minimum: deterministic


def face_blocks(gram: np.ndarray, supports: np.ndarray) -> np.ndarray:
    """The principal sub-matrices gram[S, S] of every support S: [num_supports, k, k]."""
    return gram[supports[:, :, None], supports[:, None, :]]


def solve_faces(matrices: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched ``matrices⁻¹ rhs`` ([S, k, k] and [S, k, r]); when a face's matrix is exactly
    singular (duplicate or zero gradients), pseudo-inverse solutions for that batch."""
    try:
        return np.linalg.solve(matrices, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(matrices) @ rhs


def quadratic_form(gram: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """wᵀ K w for every row w of ``weights`` ([N, m] -> [N])."""
    return np.einsum("ni,ij,nj->n", weights, gram, weights)
