"""FAMO: Liu, Liang, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS
2023, Algorithm 1. O(1) in T: uses the losses only, never the Gram matrix.

Task logits ξ (init 0), weights z = softmax(ξ). The model descends Σ_i z_i log D_i / Σ_j z_j/D_j
with D_i = L_i - L_i* (``min_losses``, 0 by default), i.e. c_i = (z_i / D_i) / Σ_j z_j/D_j
(Σ c = 1). After the step, with δ_i = log D_i(before) - log D_i(after) measured on the same
batch, ξ descends along ∂z/∂ξᵀ δ = z ⊙ (δ - zᵀδ) with step size β and decay γ; as in
the authors' code, that step is one Adam step (weight decay γ in its L2 form).

The loss after the step needs a second forward pass; ``loss_change`` chooses:
- ``next_step`` (default): the logits are updated inside the next ``coefficients`` call
  from the change of the global loss between consecutive steps (so on different batches:
  noisier than the paper, and no extra forward pass);
- ``explicit``: the paper's form; the caller recomputes the losses on the same batch after
  the optimizer step and calls :meth:`FAMO.update`.
Absent tasks: z is the softmax over the present tasks, and only tasks present in both
measurements take part in an update. D is floored at 1e-8 where the authors add 1e-8: an
offset would make equal relative decreases look unequal, and Adam's normalisation would
turn that 1e-9-sized difference into full-size logit steps.

Defaults: β (lr) 0.025 and γ 0.01, the defaults of the authors' code (the paper tunes γ
per dataset); Adam betas (0.9, 0.999) as torch.optim.Adam in the authors' code.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trainer.balancers.adam import MaskedAdam
from trainer.balancers.base import Balancer
from trainer.balancers.registry import register_balancer

_MIN_GAP = 1e-8  # keeps log D and 1/D finite (the authors' offset, as a floor)
_LOSS_CHANGES = ("next_step", "explicit")


@register_balancer("famo")
class FAMO(Balancer):
    needs_gram = False

    def __init__(self, task_names: Sequence[str], *, lr: float = 0.025, gamma: float = 0.01,
                 min_losses: Sequence[float] | None = None, loss_change: str = "next_step",
                 betas: Sequence[float] = (0.9, 0.999)) -> None:
        super().__init__(task_names)
        if loss_change not in _LOSS_CHANGES:
            raise ValueError(f"famo: loss_change must be one of {_LOSS_CHANGES}, got {loss_change!r}")
        count = self.num_tasks
        if min_losses is not None and len(min_losses) != count:
            raise ValueError(f"famo: min_losses needs {count} values, got {len(min_losses)}")
        self.min_losses = torch.tensor(list(min_losses or [0.0] * count), dtype=torch.float64)
        self.loss_change = loss_change
        self.adam = MaskedAdam(lr=lr, betas=betas, weight_decay=gamma)
        self.state.update(
            logits=torch.zeros(count, dtype=torch.float64),
            prev_loss=torch.zeros(count, dtype=torch.float64),  # next_step: last step's losses
            prev_present=torch.zeros(count, dtype=torch.bool),
            **self.adam.initial_state(count),
        )

    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        if self.loss_change == "next_step":
            self._update_logits(self.state["prev_loss"], losses, self.state["prev_present"] & present)
            self.state["prev_loss"], self.state["prev_present"] = losses.clone(), present.clone()
        inverse = torch.where(present, _softmax(self.state["logits"], present) / self._gap(losses), 0.0)
        return inverse / inverse.sum()

    def update(self, losses_before: Tensor, losses_after: Tensor, *, present: Tensor | None = None) -> None:
        """``explicit`` mode: the global losses of one batch before and after the step."""
        if self.loss_change != "explicit":
            raise RuntimeError("famo: update() is for loss_change='explicit'; 'next_step' updates by itself")
        before = losses_before.detach().to("cpu", torch.float64)
        after = losses_after.detach().to("cpu", torch.float64)
        mask = torch.ones(self.num_tasks, dtype=torch.bool) if present is None else present.detach().to("cpu", torch.bool)
        self._update_logits(before, after, mask)

    def _update_logits(self, before: Tensor, after: Tensor, mask: Tensor) -> None:
        if not mask.any():
            return
        delta = torch.where(mask, torch.log(self._gap(before)) - torch.log(self._gap(after)), 0.0)
        z = _softmax(self.state["logits"], mask)
        self.adam.step(self.state["logits"], z * (delta - z @ delta), self.state, mask=mask)

    def _gap(self, losses: Tensor) -> Tensor:
        return (losses - self.min_losses).clamp(min=_MIN_GAP)

    def monitor(self) -> dict[str, float]:
        weights = torch.softmax(self.state["logits"], dim=0)
        return {f"balancer/weight/{t}": float(v) for t, v in zip(self.tasks, weights)}


def _softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """softmax over the masked entries, 0 elsewhere."""
    return torch.softmax(torch.where(mask, logits, -torch.inf), dim=0)
