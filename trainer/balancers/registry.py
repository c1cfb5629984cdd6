"""Balancers by name."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from trainer.balancers.base import Balancer
from trainer.config import BALANCER_KINDS

_BALANCERS: dict[str, type[Balancer]] = {}


def register_balancer(name: str) -> Callable[[type[Balancer]], type[Balancer]]:
    """Register a :class:`Balancer` subclass as ``name``; a name can be taken once.

    The config checks ``balancer.name`` against ``trainer.config.BALANCER_KINDS``, without
    importing the balancers: a listed name must be listed with the class's kind. A name
    registered from outside polytask (a bench, a notebook) is added to that list, so a config
    built in the same process may name it; ``polytask launch`` knows the listed ones only."""

    def decorator(cls: type[Balancer]) -> type[Balancer]:
        if name in _BALANCERS:
            raise ValueError(f"a balancer named {name!r} is already registered ({_BALANCERS[name].__name__})")
        kind = "fixed" if cls.fixed else "gradient" if cls.needs_gram else "loss"
        listed = BALANCER_KINDS.setdefault(name, kind)
        if listed != kind:
            raise ValueError(f"balancer {name!r} ({cls.__name__}) is of kind {kind!r}, but "
                             f"trainer.config.BALANCER_KINDS lists it as {listed!r}")
        cls.name = name
        _BALANCERS[name] = cls
        return cls

    return decorator


def balancer_names() -> list[str]:
    return list(_BALANCERS)


def balancer_class(name: str) -> type[Balancer]:
    if name not in _BALANCERS:
        raise ValueError(f"no balancer registered as {name!r}; registered: {balancer_names()}")
    return _BALANCERS[name]


def build_balancer(name: str, task_names: Sequence[str], **options: Any) -> Balancer:
    """``name``'s balancer for ``task_names``; ``options`` override its (paper) defaults."""
    cls = balancer_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "task_names")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"balancer {name!r}: unknown option(s) {unknown}; accepted: {accepted}")
    return cls(task_names, **options)
