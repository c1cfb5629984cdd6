"""Fixed coefficients: equal weighting and user-given static weights (linear scalarisation)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from trainer.balancers.base import Balancer
from trainer.balancers.registry import register_balancer


@register_balancer("equal")
class Equal(Balancer):
    """c_i = 1 for every present task: the plain sum of the task losses (Σ c = #present)."""

    needs_gram = False
    fixed = True

    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        return torch.ones(self.num_tasks, dtype=torch.float64)


@register_balancer("static")
class Static(Balancer):
    """c_i = ``weights[task]`` (default 1.0) for every present task (the trainer passes
    ``trainer.loss_weights``); absent tasks get 0 and the others are not rescaled."""

    needs_gram = False
    fixed = True

    def __init__(self, task_names: Sequence[str], *, weights: Mapping[str, float] | None = None) -> None:
        super().__init__(task_names)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"static: weights for unknown task(s) {unknown}; tasks: {self.tasks}")
        self.weights = torch.tensor([float(weights.get(t, 1.0)) for t in self.tasks], dtype=torch.float64)

    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        return self.weights.clone()
