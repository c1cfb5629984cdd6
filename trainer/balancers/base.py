"""The interface every loss balancer implements, and the bookkeeping they share.

A balancer turns one training step's *global* statistics into one coefficient per task:

- ``gram``: K = G Gᵀ, the T×T Gram matrix of the per-task gradients g_i (rows of G) of
  the global mean losses, w.r.t. the shared representation z (``representation`` mode)
  or the shared parameters (``parameters`` mode); see :mod:`trainer.grad_stats`.
- ``losses``: the per-task mean loss over the global batch.
- ``present``: which tasks had at least one labelled sample in the global batch.

The shared trunk then descends along d = Σ_i c_i g_i. Every method below is such a linear
combination of the task gradients, with coefficients that are a function of K (never of
G itself), so ``combine(G, L) == coefficients(G Gᵀ, L) @ G`` by construction.

Contract, the same for every method:

- Absent tasks get coefficient exactly 0 and are left out of the method's solve; the
  present ones are renormalised as the method prescribes (documented per method).
- All arithmetic is float64 on the CPU (T is small; data-dependent solver loops would
  otherwise need a host sync per iteration); the result comes back in the dtype and on
  the device of ``losses``. Moving the inputs to the host is one small copy per step.
- Deterministic: no global or rank-local RNG; identical inputs and state give
  bit-identical coefficients, so all ranks that feed the same all-reduced statistics
  agree. (Identical CPUs assumed: LAPACK kernels may round differently across ISAs.)
- One call of :meth:`Balancer.coefficients` is one training step: stateful methods
  update their state from the statistics they are given, and ``state["step"]`` counts
  the calls. The state holds only tensors (float64/bool, CPU) and ints, plus the task
  names, so it can go into a DCP checkpoint loaded with ``weights_only=True``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

StateValue = Tensor | int


class Balancer(ABC):
    """Base class; subclasses implement :meth:`_solve` and register with
    :func:`trainer.balancers.registry.register_balancer`."""

    name: ClassVar[str] = ""  # set by register_balancer
    # False for loss-based methods: the trainer can skip the per-task backward passes.
    needs_gram: ClassVar[bool] = True
    # True when the coefficients never depend on the step's statistics (static, equal):
    # the trainer then needs no statistics before the backward pass, so gradient
    # accumulation works (see :meth:`fixed_coefficients`).
    fixed: ClassVar[bool] = False

    def __init__(self, task_names: Sequence[str]) -> None:
        tasks = list(task_names)
        if not tasks:
            raise ValueError("a balancer needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names: {tasks}")
        self.tasks = tasks
        # All mutable state lives here, so that state_dict/load_state_dict are generic.
        self.state: dict[str, StateValue] = {"step": 0}

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def coefficients(self, gram: Tensor | None, losses: Tensor, *, present: Tensor | None = None) -> Tensor:
        """One step: coefficients c[T] such that the trunk descends along Σ c_i g_i.

        ``gram`` (T×T) is required when :attr:`needs_gram`, ignored otherwise. ``present``
        (bool [T]) defaults to all tasks. Returns ``losses.dtype`` on ``losses.device``.
        """
        count = self.num_tasks
        if tuple(losses.shape) != (count,):
            raise ValueError(f"losses: expected shape ({count},), got {tuple(losses.shape)}")
        loss64 = losses.detach().to("cpu", torch.float64)
        if not torch.isfinite(loss64).all():
            raise ValueError(f"{self.name}: non-finite losses {loss64.tolist()}; skip this step instead")
        if present is None:
            mask = torch.ones(count, dtype=torch.bool)
        elif tuple(present.shape) != (count,):
            raise ValueError(f"present: expected shape ({count},), got {tuple(present.shape)}")
        else:
            mask = present.detach().to("cpu", torch.bool)
        gram64 = self._checked_gram(gram) if self.needs_gram else None
        if mask.any():
            coef = torch.where(mask, self._solve(gram64, loss64, mask), 0.0)
        else:  # nothing labelled anywhere: no direction, and no evidence to update state from
            coef = torch.zeros(count, dtype=torch.float64)
        self.state["step"] = int(self.state["step"]) + 1
        return coef.to(device=losses.device, dtype=losses.dtype)

    def fixed_coefficients(self) -> Tensor:
        """float64 [T]: the coefficients of a :attr:`fixed` balancer with every task present
        (an absent task's loss is an exact zero, so its coefficient does not matter)."""
        if not self.fixed:
            raise ValueError(f"{self.name}: coefficients depend on each step's statistics")
        count = self.num_tasks
        return self._solve(None, torch.zeros(count, dtype=torch.float64), torch.ones(count, dtype=torch.bool))

    def combine(self, grads: Tensor, losses: Tensor, *, present: Tensor | None = None) -> Tensor:
        """Σ c_i g_i for an explicit (T, D) matrix of per-task gradients (one step)."""
        coef = self.coefficients(grads @ grads.T, losses, present=present)
        return coef.to(grads.dtype) @ grads

    def monitor(self) -> dict[str, float]:
        """The balancer's own state for logging (``balancer/<what>/<task>``); coefficients
        and gradient statistics are logged by :func:`trainer.grad_stats.statistics_metrics`."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tasks": list(self.tasks)}
        for key, value in self.state.items():
            out[key] = value.clone() if isinstance(value, Tensor) else value
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("tasks", [])) != self.tasks:
            raise ValueError(f"{self.name}: state is for tasks {state.get('tasks')}, this balancer has {self.tasks}")
        missing = sorted(set(self.state) - set(state))
        unknown = sorted(set(state) - set(self.state) - {"tasks"})
        if missing or unknown:
            raise ValueError(f"{self.name}: state keys missing {missing}, unknown {unknown}")
        for key, current in self.state.items():
            value = state[key]
            if isinstance(current, Tensor):
                if not isinstance(value, Tensor) or value.shape != current.shape:
                    raise ValueError(f"{self.name}: state[{key!r}] must be a tensor of shape {tuple(current.shape)}")
                self.state[key] = value.detach().to("cpu", current.dtype).clone()
            else:
                self.state[key] = int(value)

    @abstractmethod
    def _solve(self, gram: Tensor | None, losses: Tensor, present: Tensor) -> Tensor:
        """float64 [T] coefficients from float64 CPU inputs; at least one task is present.
        Entries of absent tasks are ignored (set to 0 by the caller)."""

    def _checked_gram(self, gram: Tensor | None) -> Tensor:
        count = self.num_tasks
        if gram is None:
            raise ValueError(f"{self.name} is gradient-based: coefficients() needs the Gram matrix")
        if tuple(gram.shape) != (count, count):
            raise ValueError(f"gram: expected shape ({count}, {count}), got {tuple(gram.shape)}")
        gram64 = gram.detach().to("cpu", torch.float64)
        if not torch.isfinite(gram64).all():
            raise ValueError(f"{self.name}: non-finite Gram matrix; skip this step instead")
        # Exactly symmetric whatever produced it (a GEMM need not round (i,j) and (j,i) alike).
        return (gram64 + gram64.T) / 2


def restrict(gram: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the tasks in ``mask`` and their block of ``gram``."""
    index = mask.nonzero().flatten()
    return index, gram[index][:, index]


def expand(values: Tensor, index: Tensor, size: int) -> Tensor:
    """A length-``size`` float64 vector holding ``values`` at ``index``, 0 elsewhere."""
    out = torch.zeros(size, dtype=torch.float64)
    out[index] = values
    return out
