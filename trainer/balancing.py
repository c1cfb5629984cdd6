"""One training step's loss combination: a balancer's coefficients, fixed or fed with
all-reduced statistics.

Fixed balancers (``static``, the default, with ``trainer.loss_weights``; ``equal``) need no
statistics: their coefficients are known before the step, the per-task normalisation spans
the step's micro-batches (:mod:`trainer.task_losses`), so gradient accumulation works.
Dynamic methods need the step's global statistics before the backward pass, so they take
one micro-batch per step:

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
from trainer.balancers import Balancer, balancer_class, balancer_names, build_balancer
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
    name: str = "static"  # static (weights: trainer.loss_weights), equal, uncertainty, dwa, gradnorm, ...
    mode: Literal["representation", "parameters"] = "representation"
    # Method hyper-parameters (paper defaults otherwise), e.g. {alpha: 1.5} for gradnorm.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in balancer_names():
            raise ValueError(f"balancer.name: unknown {self.name!r}; expected one of {balancer_names()}")
        if self.name == "static" and "weights" in self.options:
            raise ValueError("balancer.options.weights: static weights are set in one place, trainer.loss_weights")
        if not balancer_class(self.name).needs_gram and self.mode != "representation":
            raise ValueError(f"balancer.mode={self.mode!r} would be ignored: balancer.name={self.name!r} "
                             f"uses no gradient statistics")

    @property
    def fixed(self) -> bool:
        """The coefficients never depend on the step (static, equal)."""
        return balancer_class(self.name).fixed


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
    """

    def __init__(self, cfg: BalancerConfig, tasks: list[str], *, static_weights: dict[str, float],
                 world_size: int) -> None:
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

    @property
    def fixed(self) -> bool:
        """Coefficients known before the step (:meth:`fixed_coefficients`); no statistics."""
        return self.balancer.fixed

    def fixed_coefficients(self, device: torch.device) -> Tensor:
        return self.balancer.fixed_coefficients().to(device=device, dtype=torch.float32)

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
        if stats.finite(with_gram=self.balancer.needs_gram):
            coefficients = self.balancer.coefficients(
                stats.gram if self.balancer.needs_gram else None, stats.losses, present=stats.present
            )
        else:  # the same on every rank (global statistics): the step's gradients become
            # non-finite, the trainer skips it, and the balancer's state stays as it was
            coefficients = torch.full_like(stats.losses, float("nan"))
        weights = stats.rank_weights(coefficients, world_size=self.world_size).float()
        total = sum(weights[i] * sums[t] for i, t in enumerate(self.tasks))
        if grads is not None:  # representation mode: the trunk gets Σ w_i ∂s_i/∂z through z
            z = list(out.features.values())
            total = total + surrogate_loss(z, combine_task_gradients(grads, weights, like=z))
        return BalancedLoss(total=total, stats=stats, coefficients=coefficients)

    def state_dict(self) -> dict[str, Any]:
        """The balancer's state (a checkpoint part)."""
        return self.balancer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.balancer.load_state_dict(state)

    def metrics(self, step: BalancedLoss) -> dict[str, float]:
        return {**statistics_metrics(step.stats, self.tasks, step.coefficients), **self.balancer.monitor()}
