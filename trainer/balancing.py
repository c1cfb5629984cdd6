"""One training step's loss combination: a balancer's coefficients, fixed or fed with
all-reduced statistics.

Fixed balancers (``static``, the default, with ``trainer.loss_weights``; ``equal``) need no
statistics: their coefficients are known before the step, the per-task normalisation spans
the step's micro-batches (:mod:`trainer.task_losses`), so gradient accumulation works.
Dynamic methods need the step's global statistics before the backward pass, so they take
one micro-batch per step. Where the per-task gradients are taken is ``balancer.statistics``:

- ``features`` (representation space): the heads ran on z detached from the trunk; T
  head-only backward passes give ∂s_i/∂z (s_i = this rank's loss sum of task i). Cheap,
  but blind to conflicts between tasks labelled on different images (their z-gradients
  sit on different rows, so their cosine is 0 by construction).
- a cut in the trunk (``fpn``, the default for gradient methods; ``layer4``, ``layer3``;
  ``parameters`` = the whole trunk; :mod:`models.trunk_cut`): from the same ∂s_i/∂z, one
  vector-Jacobian product of z per (task, source) unit gives the gradients of the trunk
  parameters from the cut up (autograd runs only the segment). These see conflicts across
  images, and per source which datasets fight.

The update is the same in every case: one backward with the gradient Σ w_i ∂s_i/∂z at z
(the trunk) and Σ w_i ∂s_i/∂θ for the heads' parameters θ, both from the head-only passes
(the heads run backward once per task, never again), with w_i = c_i · world / N_i.

The Gram matrix is that of the gradients of the global mean losses: for z, local Grams add
up exactly (each rank's z is its own block); for trunk parameters one reduce-scatter of the
units' gradients gives each rank a slice of their rank-sums (cross-rank terms included), or
a CountSketch approximates it. Then ONE all-reduce carries the Gram parts, loss sums and
counts; the balancer turns the global statistics into coefficients c, identical on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from models.multitask import MultiTaskOutput
from data_pipelines.schema import Batch
from models.trunk_cut import segment_parameters
from trainer.balancers import Balancer, build_balancer
from trainer.config import BalancerConfig
from trainer.grad_stats import (
    CountSketch,
    GlobalStats,
    TaskGradients,
    combine_task_gradients,
    gram_matrix,
    reduce_statistics,
    shared_gram_partial,
    source_gram,
    source_metrics,
    unit_gradients,
    statistics_metrics,
    surrogate_loss,
    task_gradients_wrt,
)

# Every rank builds the same CountSketch: its seed is part of what the statistics are.
SKETCH_SEED = 20261206


def _gram_dtype(tensors: list[Tensor]) -> torch.dtype:
    """float32 accumulation (bf16/fp32 models), float64 for a float64 model."""
    return torch.float64 if tensors and tensors[0].dtype == torch.float64 else torch.float32


@dataclass
class BalancedLoss:
    total: Tensor  # what to back-propagate (one backward for the whole model)
    stats: GlobalStats
    coefficients: Tensor


class LossBalancing:
    """Builds the balancer and, per step, the loss to back-propagate.

    Args:
        cfg: the balancer section of the config.
        tasks: task names in the model's order.
        static_weights: ``trainer.loss_weights``, the weights of ``static`` (the one place
            they are set; the config refuses them with any other balancer).
        world_size: number of data-parallel ranks.
        source_tasks: the tasks each training source labels, in the config's source order
            (statistics of shared parameters are then also reported per pair of sources).
    """

    def __init__(self, cfg: BalancerConfig, tasks: list[str], *, static_weights: dict[str, float],
                 world_size: int, source_tasks: dict[str, list[str]] | None = None) -> None:
        options = dict(cfg.options)
        if cfg.name == "static":
            options["weights"] = static_weights
        elif static_weights:
            raise ValueError(f"trainer.loss_weights is used only with balancer.name=static, not {cfg.name!r}")
        try:
            self.balancer: Balancer = build_balancer(cfg.name, tasks, **options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"balancer.options: {e}") from None
        self.cfg = cfg
        self.tasks = tasks
        self.world_size = world_size
        self._sketch: CountSketch | None = None  # built at the first step, from the parameters' sizes
        # Units of the shared-parameter statistics: (task, source) for every source labelling
        # the task, so that sources can be compared too; one unit per task without sources.
        if source_tasks:
            pairs = [(i, src) for src, labelled in source_tasks.items() for i, t in enumerate(tasks) if t in labelled]
        else:
            pairs = [(i, None) for i in range(len(tasks))]
        self.unit_tasks = [i for i, _ in pairs]
        self.unit_sources = [src for _, src in pairs]
        self.sources = list(source_tasks or {})
        self._units = torch.zeros(len(tasks), len(pairs), dtype=torch.float64)
        for u, i in enumerate(self.unit_tasks):
            self._units[i, u] = 1.0

    @property
    def fixed(self) -> bool:
        """Coefficients known before the step (:meth:`fixed_coefficients`); no statistics."""
        return self.balancer.fixed

    def fixed_coefficients(self, device: torch.device) -> Tensor:
        return self.balancer.fixed_coefficients().to(device=device, dtype=torch.float32)

    @property
    def detach_features(self) -> bool:
        """Whether the model should run its heads on z detached from the trunk (gradient
        methods: per-task gradients w.r.t. z cost head-only backward passes)."""
        return self.balancer.needs_gram

    def _unit_rows(self, batch: Batch, device: torch.device) -> list[tuple[int, Tensor | None]]:
        """Per unit: its task and the bool mask of this batch's samples it holds (None: none)."""
        rows = []
        labelled = batch.task_mask.tolist()  # one device-to-host copy per step, not one per unit
        for task, source in zip(self.unit_tasks, self.unit_sources):
            mask = [bool(lab[task]) and (source is None or src == source) for lab, src in zip(labelled, batch.sources)]
            rows.append((task, torch.tensor(mask, device=device) if any(mask) else None))
        return rows

    def _shared_gram(self, grads: TaskGradients, like: list[Tensor]) -> dict[str, Tensor | None]:
        """This rank's part of the units' Gram of shared-parameter gradients, for
        :func:`reduce_statistics` (collective: a reduce-scatter; none for a sketch)."""
        if self.cfg.gram == "sketch":
            if self._sketch is None:
                self._sketch = CountSketch(like, dim=self.cfg.sketch_dim, seed=SKETCH_SEED)
            return {"gram": None, "sketch": self._sketch(grads, like)}
        return {"gram": shared_gram_partial(grads, like, world_size=self.world_size, dtype=_gram_dtype(like))}

    def balanced_loss(self, out: MultiTaskOutput, batch: Batch, local_counts: Tensor, *,
                      trunk: nn.Module, heads: nn.Module) -> BalancedLoss:
        """The step's loss from one forward's output (collective: for shared-parameter
        statistics one reduce-scatter, then always one all-reduce). ``trunk``: the shared
        backbone + FPN; ``heads``: every parameter the losses use above z."""
        sums = {t: out.losses[t] * local_counts[i] for i, t in enumerate(self.tasks)}
        absent = (local_counts == 0).tolist()
        z_grads, units = None, None
        if not self.balancer.needs_gram:
            reduced = {"gram": torch.zeros(len(self.tasks), len(self.tasks), device=local_counts.device)}
        else:  # from the model's taps, not its outputs (see models.multitask.GradientTaps)
            leaves, z = list(out.head_features.values()), list(out.taps.features.values())
            tap_sums = {t: out.taps.losses[t] * local_counts[i] for i, t in enumerate(self.tasks)}
            head_params = [p for p in heads.parameters() if p.requires_grad]
            # T head-only passes; each also gives its task's head-parameter gradients, so
            # the update's backward does not run the heads a second time.
            pass_grads = task_gradients_wrt(leaves, tap_sums, self.tasks, skip=absent, params=head_params)
            z_grads = [None if g is None else g[:len(leaves)] for g in pass_grads]
            head_grads = [None if g is None else g[len(leaves):] for g in pass_grads]
            if self.cfg.where == "features":
                # Each rank's z is its own block of the global batch's z: local Grams add up exactly.
                reduced = {"gram": gram_matrix(z_grads, dtype=_gram_dtype(leaves), device=local_counts.device)}
            else:  # per (task, source) unit, one backward from z down to the segment's parameters
                shared = segment_parameters(trunk, self.cfg.where)
                grads = unit_gradients(z, z_grads, shared, self._unit_rows(batch, local_counts.device))
                reduced = self._shared_gram(grads, shared)
                units = self._units.to(local_counts.device)
        loss_sums = torch.stack([s.detach().float() for s in sums.values()])
        stats = reduce_statistics(loss_sums=loss_sums, counts=local_counts, world_size=self.world_size,
                                  units=units, **reduced)
        if stats.finite(with_gram=self.balancer.needs_gram):
            coefficients = self.balancer.coefficients(
                stats.gram if self.balancer.needs_gram else None, stats.losses, present=stats.present
            )
        else:  # the same on every rank (global statistics): the step's gradients become
            # non-finite, the trainer skips it, and the balancer's state stays as it was
            coefficients = torch.full_like(stats.losses, float("nan"))
        loss_dtype = torch.promote_types(loss_sums.dtype, out.losses[self.tasks[0]].dtype)  # float64 models stay exact
        weights = stats.rank_weights(coefficients, world_size=self.world_size).to(loss_dtype)
        if z_grads is None:
            total = sum(weights[i] * sums[t] for i, t in enumerate(self.tasks))
        else:  # the trunk gets Σ w_i ∂s_i/∂z through z, the heads Σ w_i ∂s_i/∂θ: one backward, whatever the statistics
            z = list(out.features.values())
            total = (surrogate_loss(z, combine_task_gradients(z_grads, weights, like=z))
                     + surrogate_loss(head_params, combine_task_gradients(head_grads, weights, like=head_params)))
        return BalancedLoss(total=total, stats=stats, coefficients=coefficients)

    def state_dict(self) -> dict[str, Any]:
        """The balancer's state (a checkpoint part)."""
        return self.balancer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.balancer.load_state_dict(state)

    def metrics(self, step: BalancedLoss) -> dict[str, float]:
        row = {**statistics_metrics(step.stats, self.tasks, step.coefficients), **self.balancer.monitor()}
        if step.stats.unit_gram is not None and len(self.sources) > 1:
            gram = source_gram(step.stats, step.coefficients, self.unit_tasks, self.unit_sources, self.sources)
            row.update(source_metrics(gram, self.sources))
        return row
