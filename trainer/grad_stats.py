"""Per-task gradient statistics for dynamic loss balancing, reduced over all ranks.

The per-task gradients w.r.t. the shared features z come from T head-only passes
(:func:`task_gradients_wrt`: one ``torch.autograd.grad`` per task, which accumulates nothing
into ``.grad`` and fires no DDP reducer hook). Gradients of shared trunk parameters follow
from them by one vector-Jacobian product of z per (task, source) unit
(:func:`unit_gradients`), through the trunk segment only; :mod:`trainer.balancing` says which
parameters (``balancer.statistics``).

What the global Gram matrix is. Each rank passes the gradients of its local loss *sums*
(local mean × local count) for task i, s_i^r. The global mean loss of task i is
L_i = Σ_r s_i^r / N_i, and K_ij = ⟨∇L_i, ∇L_j⟩ is the Gram matrix one process with the
whole global batch would compute:

- At z, each rank's z is its own block of the global batch's z, so ∇_z L_i is the
  concatenation of the blocks ∇_{z_r} s_i^r / N_i and K_ij = Σ_r ⟨∇s_i^r, ∇s_j^r⟩ / (N_i N_j):
  local Gram matrices (:func:`gram_matrix`) add up exactly.
- For parameters, which the ranks share, ∇_θ L_i = Σ_r ∇_θ s_i^r / N_i and the cross-rank
  terms ⟨∇s_i^r, ∇s_j^q⟩ (r ≠ q) matter: summing local Grams would drop them.
  :func:`shared_gram_partial` reduce-scatters the gradients so that each rank holds the
  rank-sum of a slice and forms that slice's Gram; those add up exactly. A
  :class:`CountSketch` instead exchanges T × k values and estimates the Gram unbiasedly.

:func:`reduce_statistics` then sums the Gram parts (or sketches), the loss sums and the
labelled counts over the ranks with ONE all-reduce of one packed float64 tensor, run by
every rank every step whatever its batch holds (collectives must match), and derives
everything else from the sums. The balancers (:mod:`trainer.balancers`) see only these
global statistics.

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
                       skip: Sequence[bool] | None = None, params: Sequence[Tensor] = ()) -> TaskGradients:
    """∂losses[t]/∂features for every task, one ``torch.autograd.grad`` each (the graph is
    retained for the caller's own backward). ``None`` for a task whose loss does not depend
    on the features or that ``skip`` marks (e.g. no labelled sample on this rank: its
    loss is an exact 0) — a zero gradient, with no memory and no backward pass spent on
    it. A feature a task does not use gets a zero tensor.

    ``params`` (the heads' parameters): each task's list goes on with ∂losses[t]/∂params
    from the same pass, None for a parameter the task does not use (heads are mostly
    task-specific: no zeros are made for the others' parameters). Then the update's
    backward need not run the heads again (:mod:`trainer.balancing`)."""
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
        grads = torch.autograd.grad(loss, inputs + list(params), retain_graph=True, allow_unused=True)
        if all(g is None for g in grads[:len(inputs)]):
            out.append(None)
        else:
            out.append([torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)] + list(grads[len(inputs):]))
    return out


def unit_gradients(features: Sequence[Tensor], feature_grads: TaskGradients, params: Sequence[Tensor],
                   rows: Sequence[tuple[int, Tensor | None]]) -> TaskGradients:
    """Per *unit* (task i, a set of samples): the gradient of task i's loss sum over those
    samples w.r.t. shared ``params`` — one vector-Jacobian product of the shared ``features``
    (z, attached to the trunk) with ∂s_i/∂z kept on the unit's rows only (linear: the units
    of a task add up to its gradient). ``rows``: per unit, (task index, bool [B] mask on
    the features' device, or None when the unit has no local sample).

    The backward pass runs from z down to ``params`` only (autograd executes just the
    nodes on a path to the requested inputs), through no head; like every
    ``autograd.grad`` here it accumulates nothing and fires no DDP hook. None for a unit
    without a local sample or whose task has no gradient."""
    out: TaskGradients = []
    for task, mask in rows:
        grads = feature_grads[task]
        if grads is None or mask is None or not params:
            out.append(None)
            continue
        masked = [g * mask.to(g.dtype).view(-1, *([1] * (g.dim() - 1))) for g in grads]
        got = torch.autograd.grad(list(features), list(params), grad_outputs=masked, retain_graph=True,
                                  allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, got)])
    return out


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


def flat_task_gradients(grads: TaskGradients, like: Sequence[Tensor], *, dtype: torch.dtype) -> Tensor:
    """[T, P]: each task's gradients concatenated in the order of ``like`` (zeros for None)."""
    return blocked_task_gradients(grads, like, blocks=1, dtype=dtype)[0]


def blocked_task_gradients(grads: TaskGradients, like: Sequence[Tensor], *, blocks: int,
                           dtype: torch.dtype) -> Tensor:
    """[blocks, T, chunk]: the [T, P] of :func:`flat_task_gradients` cut into ``blocks``
    slices of ``chunk`` = ⌈P / blocks⌉ coordinates (the last zero-padded), slice r in
    ``[r]``. Each gradient tensor is copied once, straight to its place: no flat copy,
    no padded copy, no transposed copy (together 20 ms of a 2-rank CPU demo step)."""
    size = sum(x.numel() for x in like)
    chunk = -(-size // blocks)
    device = like[0].device if like else torch.device("cpu")
    out = torch.empty(blocks, len(grads), chunk, dtype=dtype, device=device)
    for block in range(blocks):  # the coordinates past P: padding
        if (block + 1) * chunk > size:
            out[block, :, max(0, size - block * chunk):].zero_()
    for i, task_grads in enumerate(grads):
        if task_grads is None:
            out[:, i].zero_()
            continue
        start = 0  # of the tensor's coordinates in the task's flat vector
        for g in task_grads:
            values = g.reshape(-1)
            done = 0
            while done < values.numel():
                block, offset = divmod(start + done, chunk)
                take = min(values.numel() - done, chunk - offset)
                out[block, i, offset:offset + take].copy_(values[done:done + take])
                done += take
            start += values.numel()
    return out


def shared_gram_partial(grads: TaskGradients, like: Sequence[Tensor], *, world_size: int,
                        dtype: torch.dtype = torch.float32, exchange: str | None = None) -> Tensor:
    """This rank's share of the Gram matrix of Σ_r g_i^r, the per-task gradients of the
    ranks' *shared* parameters summed over the ranks (cross-rank terms included).

    One reduce-scatter of the [T, P] gradients: each rank receives the rank-sum of a 1/W
    slice of the parameters and forms that slice's [T, T] Gram; the slices' Grams add up
    (in :func:`reduce_statistics`' all-reduce) to the Gram of the summed gradients. Half
    the bytes of an all-reduce of the gradients, and 1/W of the Gram's flops per rank.
    Collective when ``world_size`` > 1: every rank calls it, whatever its batch holds.
    ``exchange``: "reduce_scatter", or "all_to_all" (the blocks exchanged, then added here);
    None: all_to_all on gloo, whose reduce-scatter costs more than a whole all-reduce
    (20 MB on 2 CPU ranks: reduce-scatter 28.6 ms, all-reduce 19.8, all-to-all 17.3)."""
    # [W, T, chunk]: rank r's input block r is the r-th slice of every task.
    blocks = blocked_task_gradients(grads, like, blocks=world_size, dtype=dtype)
    if world_size == 1:
        return blocks[0] @ blocks[0].T
    _, count, chunk = blocks.shape
    if exchange is None:
        exchange = "all_to_all" if dist.get_backend() == "gloo" else "reduce_scatter"
    if exchange == "all_to_all":
        received = torch.empty(world_size * count * chunk, dtype=dtype, device=blocks.device)
        dist.all_to_all_single(received, blocks.reshape(-1))
        mine = received.reshape(world_size, count, chunk).sum(0)
    else:
        mine = torch.empty(count * chunk, dtype=dtype, device=blocks.device)
        dist.reduce_scatter_single(mine, blocks.reshape(-1))  # reduce_scatter_tensor, as torch 2.14 names it
        mine = mine.reshape(count, chunk)
    return mine @ mine.T


class CountSketch:
    """A linear sketch of per-task gradients: coordinate p goes to bucket h(p) with sign
    s(p), the same seeded (h, s) on every rank, so sketches add over ranks like gradients.

    For vectors a, b and k buckets, ⟨Sa, Sb⟩ is an unbiased estimate of ⟨a, b⟩ with
    Var = (‖a‖²‖b‖² + ⟨a,b⟩² − 2 Σ_p a_p² b_p²) / k ≤ (‖a‖²‖b‖² + ⟨a,b⟩²) / k:
    a cosine's standard error is at most √((1 + cos²)/k) ≤ √(2/k) (0.044 at k = 1024).
    The ranks exchange T × k values instead of T × P.
    """

    def __init__(self, like: Sequence[Tensor], *, dim: int, seed: int = 0) -> None:
        size = sum(x.numel() for x in like)
        gen = torch.Generator().manual_seed(seed)
        device = like[0].device if like else torch.device("cpu")
        self.dim = dim
        self.size = size
        self.bucket = torch.randint(dim, (size,), generator=gen).to(device)
        self.sign = (torch.randint(2, (size,), generator=gen, dtype=torch.int8) * 2 - 1).to(device)

    def __call__(self, grads: TaskGradients, like: Sequence[Tensor], *, dtype: torch.dtype = torch.float64) -> Tensor:
        """[T, k] sketches of the per-task gradients (rows of zeros for None)."""
        flat = flat_task_gradients(grads, like, dtype=dtype)
        if flat.shape[1] != self.size:
            raise ValueError(f"CountSketch: built for {self.size} values, given {flat.shape[1]}")
        out = torch.zeros(flat.shape[0], self.dim, dtype=dtype, device=flat.device)
        return out.index_add_(1, self.bucket, flat * self.sign.to(dtype))


def combine_task_gradients(grads: TaskGradients, weights: Tensor, *, like: Sequence[Tensor]) -> list[Tensor]:
    """Σ_i weights[i] · grads[i], one tensor per entry of ``like`` (shape and dtype; zeros
    when no task contributes, so that every rank can run the trunk backward). A None entry
    in a task's list is a zero gradient."""
    # At least float32 (bf16 gradients), float64 for a float64 model.
    out = [torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32)) for x in like]
    for i, task_grads in enumerate(grads):
        if task_grads is None:
            continue
        for acc, g in zip(out, task_grads):
            if g is not None:
                acc.add_(g.to(acc.dtype) * weights[i].to(acc.dtype))  # a device scalar: no host sync
    return [acc.to(x.dtype) for acc, x in zip(out, like)]


def surrogate_loss(features: Sequence[Tensor], combined: Sequence[Tensor]) -> Tensor:
    """Σ_k ⟨z_k, combined_k⟩ (value in float32, ``combined`` held constant): a scalar whose
    gradient w.r.t. the features (or parameters) is ``combined``. For engines that
    back-propagate scalars only (DeepSpeed's ``engine.backward``), and to give the trunk
    and the heads their combined gradients in one backward pass."""
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
    unit_gram: Tensor | None = None  # [U, U] rank-summed Gram of (task, source) units' loss-sum gradients

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


def reduce_statistics(gram: Tensor | None, loss_sums: Tensor, counts: Tensor, *, world_size: int,
                      sketch: Tensor | None = None, units: Tensor | None = None) -> GlobalStats:
    """Global statistics from this rank's ``gram`` (its share of the Gram matrix of the
    gradients of the loss *sums*: of its own gradients in representation space, or its
    slice from :func:`shared_gram_partial`) or ``sketch`` (its [T, k] :class:`CountSketch`
    of its gradients of shared parameters), ``loss_sums`` (Σ of its per-sample losses, =
    local mean × count) and ``counts`` (labelled samples), with exactly one all-reduce when
    ``world_size`` > 1. ``units`` ([T, U], 0/1): the Gram's rows are U units (task, source)
    of the T tasks; a task's gradient is the sum of its units'."""
    count = loss_sums.shape[0]
    if (gram is None) == (sketch is None):
        raise ValueError("reduce_statistics: give exactly one of gram and sketch")
    reduced = gram if sketch is None else sketch
    rows = count if units is None else units.shape[1]
    if (sketch is None and tuple(reduced.shape) != (rows, rows)) or reduced.shape[0] != rows \
            or tuple(counts.shape) != (count,) or (units is not None and units.shape[0] != count):
        raise ValueError(f"shapes: {'gram' if sketch is None else 'sketch'} {tuple(reduced.shape)}, "
                         f"loss_sums {tuple(loss_sums.shape)}, counts {tuple(counts.shape)}")
    device = loss_sums.device
    packed = torch.cat([
        reduced.detach().to(device, torch.float64).reshape(-1),
        loss_sums.detach().to(device, torch.float64),
        counts.detach().to(device, torch.float64),
    ])
    if world_size > 1:
        dist.all_reduce(packed)
    size = reduced.numel()
    sums_gram = packed[:size].reshape(reduced.shape)
    if sketch is not None:
        sums_gram = sums_gram @ sums_gram.T
    unit_gram = None
    if units is not None:
        unit_gram = sums_gram
        sums_gram = units.to(sums_gram) @ unit_gram @ units.to(sums_gram).T
    total_loss, total_count = packed[size: size + count], packed[size + count:]
    present = total_count > 0
    denom = total_count.clamp(min=1)
    global_gram = torch.where(present[:, None] & present[None, :], sums_gram / (denom[:, None] * denom[None, :]), 0.0)
    norms = global_gram.diagonal().clamp(min=0).sqrt()
    cosine, conflict_fraction = cosines(global_gram)
    return GlobalStats(gram=global_gram, losses=total_loss / denom, counts=total_count, present=present,
                       norms=norms, cosine=cosine, conflict_fraction=conflict_fraction, unit_gram=unit_gram)


def cosines(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise cosines of a Gram matrix (0 where a norm is 0) and the fraction of pairs of
    nonzero vectors with a negative cosine."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    nonzero = norms > 0
    pair = nonzero[:, None] & nonzero[None, :]
    cosine = torch.where(pair, gram / (norms[:, None] * norms[None, :]).clamp(min=torch.finfo(gram.dtype).tiny), 0.0)
    upper = torch.triu(pair, diagonal=1)
    return cosine, (upper & (cosine < 0)).sum().double() / upper.sum().clamp(min=1)


def source_gram(stats: GlobalStats, coefficients: Tensor, unit_tasks: Sequence[int], unit_sources: Sequence[str],
                sources: Sequence[str]) -> Tensor:
    """[S, S] Gram of the sources' parts of the step's update: source s contributes
    Σ_{units (i, s)} c_i ∇s_i^(s) / N_i (its samples' share of Σ_i c_i ∇L_i)."""
    if stats.unit_gram is None:
        raise ValueError("source_gram: the statistics were not taken per (task, source) unit")
    scale = coefficients.to(stats.counts) / stats.counts.clamp(min=1)
    weights = torch.zeros(len(sources), len(unit_tasks), dtype=stats.unit_gram.dtype, device=stats.unit_gram.device)
    for u, (task, source) in enumerate(zip(unit_tasks, unit_sources)):
        weights[sources.index(source), u] = scale[task]
    return weights @ stats.unit_gram @ weights.T


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


def source_metrics(gram: Tensor, sources: Sequence[str]) -> dict[str, float]:
    """Scalars for the metrics log: cosines between the sources' parts of the update (which
    datasets fight) and the fraction of conflicting pairs of sources."""
    cosine, conflict = cosines(gram)
    cos = cosine.tolist()
    row = {f"balancer/source_cos/{a}/{sources[j]}": cos[i][j]
           for i, a in enumerate(sources) for j in range(i + 1, len(sources))}
    row["balancer/source_conflict_fraction"] = float(conflict)
    return row
