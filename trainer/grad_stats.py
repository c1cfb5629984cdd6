"""Per-task gradient statistics for dynamic loss balancing, reduced over all ranks.

Two ways to get the per-task gradients g_i:

- ``representation`` mode: the heads run on the shared features z *detached* from the
  trunk (:func:`detached_features`); :func:`task_gradients_wrt` takes T backward passes
  through the heads only, giving ∂L_i/∂z; the trunk then gets one backward with the
  combined gradient Σ c_i g_i (:func:`combine_task_gradients`, back-propagated from z
  directly or through :func:`surrogate_loss`) — its cost does not grow with T. (For MGDA
  this is the paper's upper-bound variant, MGDA-UB.)
- ``parameters`` mode: :func:`parameter_gradients` gives the exact per-task gradients of
  the shared parameters (T backward passes through the trunk).

Each rank forms the Gram matrix of its local gradients (:func:`gram_matrix`);
:func:`reduce_statistics` sums it, the loss sums and the labelled counts over the ranks
with ONE all-reduce of one packed float64 tensor, run by every rank every step whatever
its batch holds (collectives must match), and derives everything else from the sums.
The balancers (:mod:`trainer.balancers`) see only these global statistics.

What the global Gram matrix is. Each rank passes the gradients of its local loss *sums*
(local mean × local count) for task i, s_i^r. The global mean loss of task i is
L_i = Σ_r s_i^r / N_i. In representation mode each rank's z is its own block of the
global batch's z, so ∇_z L_i is the concatenation of the blocks ∇_{z_r} s_i^r / N_i and
    K_ij = ⟨∇L_i, ∇L_j⟩ = Σ_r ⟨∇s_i^r, ∇s_j^r⟩ / (N_i N_j)
exactly: the Gram matrix of the gradients of the global mean losses, as one big batch
would give it. In parameters mode the ranks share the parameters, ∇_θ L_i = Σ_r ∇_θ s_i^r / N_i
and the cross-rank terms ⟨∇s_i^r, ∇s_j^q⟩ (r ≠ q) are missing from the sum: the result is
exact with one rank, and otherwise the Gram matrix of the rank-stacked gradients.

bf16 autocast: the gradients may be bf16; the Gram matrix is accumulated in float32 (or
float64) and everything after it is float64.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

TaskGradients = list[list[Tensor] | None]  # per task: one gradient per input tensor; None = zero


def detached_features(features: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """The shared features cut from the trunk, as leaves that collect the heads' gradients
    (representation mode: the heads' backward passes stop at z)."""
    return OrderedDict((name, z.detach().requires_grad_(True)) for name, z in features.items())


def task_gradients_wrt(features: Sequence[Tensor], losses: Mapping[str, Tensor], tasks: Sequence[str], *,
                       skip: Sequence[bool] | None = None) -> TaskGradients:
    """∂losses[t]/∂features for every task, one ``torch.autograd.grad`` each (the graph is
    retained for the caller's own backward). ``None`` for a task whose loss does not depend
    on the features or that ``skip`` marks (e.g. no labelled sample on this rank: its
    loss is an exact 0) — a zero gradient, with no memory and no backward pass spent on
    it. A feature a task does not use gets a zero tensor."""
    skip = [False] * len(tasks) if skip is None else list(skip)
    if len(skip) != len(tasks):
        raise ValueError(f"skip: expected {len(tasks)} flags, got {len(skip)}")
    inputs = list(features)
    out: TaskGradients = []
    for task, skipped in zip(tasks, skip):
        loss = losses[task]
        if skipped or not loss.requires_grad:
            out.append(None)
            continue
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        if all(g is None for g in grads):
            out.append(None)
        else:
            out.append([torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)])
    return out


def parameter_gradients(params: Sequence[Tensor], losses: Mapping[str, Tensor], tasks: Sequence[str], *,
                        skip: Sequence[bool] | None = None) -> TaskGradients:
    """``parameters`` mode: the exact per-task gradients of the shared ``params`` (T
    backward passes through the trunk; same conventions as :func:`task_gradients_wrt`).
    ``torch.autograd.grad`` accumulates nothing into ``.grad`` and fires no DDP reducer
    hook (checked with DDP on gloo), so these passes are local without ``no_sync()``; the
    update is then one ordinary, synchronising backward of Σ_i w_i s_i with the weights of
    :meth:`GlobalStats.rank_weights`."""
    return task_gradients_wrt(params, losses, tasks, skip=skip)


def gram_matrix(grads: TaskGradients, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Tensor:
    """G Gᵀ of the per-task gradients, as a sum over the tensors of per-pair dot products
    (no concatenated copy of the gradients), accumulated in ``dtype``; exactly symmetric.
    ``device`` defaults to the gradients' (CPU when every task's gradient is None)."""
    present = [g for g in grads if g is not None]
    if device is None:
        device = present[0][0].device if present else torch.device("cpu")
    count = len(grads)
    gram = torch.zeros(count, count, dtype=dtype, device=device)
    for i in range(count):
        if grads[i] is None:
            continue
        for j in range(i, count):
            if grads[j] is None:
                continue
            dot = sum(torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)) for a, b in zip(grads[i], grads[j]))
            gram[i, j] = dot
            gram[j, i] = dot
    return gram


def combine_task_gradients(grads: TaskGradients, weights: Tensor, *, like: Sequence[Tensor]) -> list[Tensor]:
    """Σ_i weights[i] · grads[i], one tensor per entry of ``like`` (shape and dtype; zeros
    when no task contributes, so that every rank can run the trunk backward)."""
    out = [torch.zeros_like(x, dtype=torch.float32) for x in like]
    for weight, task_grads in zip(weights.to(torch.float32), grads):
        if task_grads is None:
            continue
        for acc, g in zip(out, task_grads):
            acc.add_(g.to(torch.float32) * weight)  # a device scalar: no host sync
    return [acc.to(x.dtype) for acc, x in zip(out, like)]


def surrogate_loss(features: Sequence[Tensor], combined: Sequence[Tensor]) -> Tensor:
    """Σ_k ⟨z_k, combined_k⟩ (value in float32, ``combined`` held constant): a scalar whose
    gradient w.r.t. the features is ``combined``. For engines that back-propagate scalars
    only (DeepSpeed's ``engine.backward``), and to run the trunk's and the heads' backward
    as one pass (add the heads' weighted losses to it)."""
    # The gradient is exactly ``combined`` in z's dtype; only the (unused) value is summed in float32.
    return sum((z * c.detach().to(z.dtype)).sum(dtype=torch.float32) for z, c in zip(features, combined))


@dataclass(frozen=True)
class GlobalStats:
    """One step's statistics over the global batch (float64, on the device of the inputs)."""

    gram: Tensor  # [T, T] Gram matrix of the gradients of the global mean losses
    losses: Tensor  # [T] global mean loss (0 where absent)
    counts: Tensor  # [T] labelled samples over all ranks
    present: Tensor  # [T] bool: counts > 0
    norms: Tensor  # [T] gradient norms, sqrt(diag(gram))
    cosine: Tensor  # [T, T] pairwise cosine similarities (0 where a norm is 0)
    conflict_fraction: Tensor  # [] fraction of pairs of nonzero gradients with cosine < 0

    def finite(self, *, with_gram: bool) -> bool:
        """Whether the losses (and the Gram matrix) are finite; one host sync."""
        values = torch.cat([self.losses, self.gram.reshape(-1)]) if with_gram else self.losses
        return bool(torch.isfinite(values).all())

    def rank_weights(self, coefficients: Tensor, *, world_size: int) -> Tensor:
        """Weights for this rank's gradients of its local loss *sums*, such that DDP's
        average over ranks is Σ_i c_i ∇L_i (L_i the global mean): c_i · world_size / N_i,
        0 for absent tasks. Use them in :func:`combine_task_gradients` (representation
        mode) or as loss weights of the local sums (parameters mode)."""
        weights = coefficients.to(self.counts) * world_size / self.counts.clamp(min=1)
        return torch.where(self.present, weights, 0.0)


def reduce_statistics(gram: Tensor, loss_sums: Tensor, counts: Tensor, *, world_size: int) -> GlobalStats:
    """Global statistics from this rank's ``gram`` (of the gradients of its local loss
    sums), ``loss_sums`` (Σ of its per-sample losses, = local mean × count) and ``counts``
    (labelled samples), with exactly one all-reduce when ``world_size`` > 1."""
    count = loss_sums.shape[0]
    if tuple(gram.shape) != (count, count) or tuple(counts.shape) != (count,):
        raise ValueError(f"shapes: gram {tuple(gram.shape)}, loss_sums {tuple(loss_sums.shape)}, counts {tuple(counts.shape)}")
    device = loss_sums.device
    packed = torch.cat([
        gram.detach().to(device, torch.float64).reshape(-1),
        loss_sums.detach().to(device, torch.float64),
        counts.detach().to(device, torch.float64),
    ])
    if world_size > 1:
        dist.all_reduce(packed)
    sums_gram = packed[: count * count].reshape(count, count)
    total_loss, total_count = packed[count * count: count * count + count], packed[count * count + count:]
    present = total_count > 0
    denom = total_count.clamp(min=1)
    global_gram = torch.where(present[:, None] & present[None, :], sums_gram / (denom[:, None] * denom[None, :]), 0.0)
    norms = global_gram.diagonal().clamp(min=0).sqrt()
    nonzero = norms > 0
    pair = nonzero[:, None] & nonzero[None, :]
    cosine = torch.where(pair, global_gram / (norms[:, None] * norms[None, :]).clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    upper = torch.triu(pair, diagonal=1)
    conflict_fraction = (upper & (cosine < 0)).sum().double() / upper.sum().clamp(min=1)
    return GlobalStats(gram=global_gram, losses=total_loss / denom, counts=total_count, present=present,
                       norms=norms, cosine=cosine, conflict_fraction=conflict_fraction)


def statistics_metrics(stats: GlobalStats, tasks: Sequence[str], coefficients: Tensor) -> dict[str, float]:
    """Scalars for the metrics log (one host sync): per-task coefficient and gradient norm,
    the pairwise cosines and the fraction of conflicting pairs."""
    coef, norms, cosine = coefficients.tolist(), stats.norms.tolist(), stats.cosine.tolist()
    row = {f"balancer/coef/{t}": coef[i] for i, t in enumerate(tasks)}
    row.update({f"balancer/grad_norm/{t}": norms[i] for i, t in enumerate(tasks)})
    for i, a in enumerate(tasks):
        for j in range(i + 1, len(tasks)):
            row[f"balancer/cos/{a}/{tasks[j]}"] = cosine[i][j]
    row["balancer/conflict_fraction"] = float(stats.conflict_fraction)
    return row
