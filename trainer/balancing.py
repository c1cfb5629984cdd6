"""One training step's loss combination: static weights, or a dynamic balancer fed with
all-reduced gradient statistics.

Static weights (``balancer.name: static``, the default) need no gradient statistics; the
per-task normalisation spans the step's micro-batches (:mod:`trainer.task_losses`), so
gradient accumulation works. Dynamic methods need the step's global statistics before
the backward pass, so they take one micro-batch per step:

- ``representation`` mode: the heads ran on z detached from the trunk; T head-only
  backward passes give ∂s_i/∂z (s_i = this rank's loss sum of task i), their Gram matrix,
  loss sums and counts go through ONE all-reduce, the balancer turns the global statistics
  into coefficients c (identical on every rank), and one backward of
  ⟨z, Σ w_i ∂s_i/∂z⟩ + Σ w_i s_i (w_i = c_i · world / N_i) trains trunk and heads.
- ``parameters`` mode: exact per-task gradients of the shared trunk parameters (T trunk
  backward passes, local: ``autograd.grad`` fires no DDP hook), then one ordinary backward
  of Σ w_i s_i.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from models.multitask import MultiTaskOutput
from trainer.balancers import Balancer, balancer_names, build_balancer
from trainer.grad_stats import (
    GlobalStats,
    combine_task_gradients,
    gram_matrix,
    parameter_gradients,
    reduce_statistics,
    statistics_metrics,
    surrogate_loss,
    task_gradients_wrt,
)


@dataclass(kw_only=True)
class BalancerConfig:
    name: str = "static"  # static (trainer.loss_weights), equal, uncertainty, dwa, gradnorm, ...
    mode: Literal["representation", "parameters"] = "representation"
    # Method hyper-parameters (paper defaults otherwise), e.g. {alpha: 1.5} for gradnorm.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in balancer_names():
            raise ValueError(f"balancer.name: unknown {self.name!r}; expected one of {balancer_names()}")


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
        static_weights: ``trainer.loss_weights`` (used by ``static``).
        world_size: number of data-parallel ranks.
    """

    def __init__(self, cfg: BalancerConfig, tasks: list[str], *, static_weights: dict[str, float],
                 world_size: int) -> None:
        options = dict(cfg.options)
        if cfg.name == "static":
            options.setdefault("weights", static_weights)
        try:
            self.balancer: Balancer = build_balancer(cfg.name, tasks, **options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"balancer.options: {e}") from None
        self.cfg = cfg
        self.tasks = tasks
        self.world_size = world_size

    @property
    def is_static(self) -> bool:
        return self.cfg.name == "static"

    @property
    def detach_features(self) -> bool:
        """Whether the model should run its heads on z detached from the trunk."""
        return self.balancer.needs_gram and self.cfg.mode == "representation"

    def balanced_loss(self, out: MultiTaskOutput, local_counts: Tensor, *, trunk: nn.Module) -> BalancedLoss:
        """The step's loss from one forward's output (collective: one all-reduce)."""
        sums = {t: out.losses[t] * local_counts[i] for i, t in enumerate(self.tasks)}
        absent = (local_counts == 0).tolist()
        if not self.balancer.needs_gram:
            grads = None
            gram = torch.zeros(len(self.tasks), len(self.tasks), device=local_counts.device)
        elif self.cfg.mode == "representation":
            grads = task_gradients_wrt(list(out.head_features.values()), sums, self.tasks, skip=absent)
            gram = gram_matrix(grads, device=local_counts.device)
        else:
            shared = [p for p in trunk.parameters() if p.requires_grad]
            gram = gram_matrix(parameter_gradients(shared, sums, self.tasks, skip=absent), device=local_counts.device)
            grads = None
        loss_sums = torch.stack([s.detach().float() for s in sums.values()])
        stats = reduce_statistics(gram, loss_sums, local_counts, world_size=self.world_size)
        coefficients = self.balancer.coefficients(
            stats.gram if self.balancer.needs_gram else None, stats.losses, present=stats.present
        )
        weights = stats.rank_weights(coefficients, world_size=self.world_size).float()
        total = sum(weights[i] * sums[t] for i, t in enumerate(self.tasks))
        if grads is not None:  # representation mode: the trunk gets Σ w_i ∂s_i/∂z through z
            z = list(out.features.values())
            total = total + surrogate_loss(z, combine_task_gradients(grads, weights, like=z))
        return BalancedLoss(total=total, stats=stats, coefficients=coefficients)

    def metrics(self, step: BalancedLoss) -> dict[str, float]:
        return {**statistics_metrics(step.stats, self.tasks, step.coefficients), **self.balancer.monitor()}
