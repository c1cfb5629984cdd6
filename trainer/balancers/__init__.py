"""Dynamic loss balancing for multi-task training.

``build_balancer(name, task_names, **options)`` gives a :class:`Balancer`; each step,
``coefficients(gram, losses, present=...)`` turns the global gradient statistics of
:func:`trainer.grad_stats.reduce_statistics` into one coefficient per task (see
:mod:`trainer.balancers.base` for the contract). Importing this package registers every
method below.
"""
from trainer.balancers import (  # noqa: F401  (imported to register the methods)
    aligned_mtl,
    cagrad,
    dwa,
    famo,
    gradnorm,
    imtl,
    mgda,
    nash_mtl,
    pcgrad,
    static,
    uncertainty,
)
from trainer.balancers.base import Balancer
from trainer.balancers.registry import balancer_class, balancer_names, build_balancer, register_balancer

__all__ = ["Balancer", "balancer_class", "balancer_names", "build_balancer", "register_balancer"]
