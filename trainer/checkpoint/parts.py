"""The training loop's own state as Stateful parts, as torchtitan keeps it: one object per
piece of state, each with ``state_dict``/``load_state_dict``, handed to the manager as a
dict ``{name: part}``. Adding a piece of state (EMA weights, say) is one more entry.

The model, optimizer and LR schedule are the backend's part: it writes them in its own
format (DCP for DDP, DeepSpeed's files for ZeRO) and these parts beside them.

Per-rank parts (RNG, data positions) keep one key per rank (DCP keeps a single copy of a
key that every rank holds). Their layout depends on how many ranks wrote the checkpoint, so
they say what to read with :meth:`PerRankPart.load_template`; a resume on another world size
reseeds the RNG and remaps the data positions so the interrupted epochs finish first.
Keys are those of earlier polytask checkpoints, which therefore still load.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful

from data_pipelines.streaming.reshard import reshard_states
from trainer.rng_state import get_rng_state, set_rng_state, seed_everything


class PerRankPart(ABC):
    """A part with one key per rank, whose layout depends on the world size that saved it."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_template(self, saved_world_size: int) -> dict[str, Any] | None:
        """What to read from a checkpoint written by ``saved_world_size`` ranks (DCP loads
        in place into it), or None to read nothing; then ``load_state_dict(None)``."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any] | None) -> None: ...


class TrainProgress:
    """The optimizer steps taken."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class RankRNG(PerRankPart):
    """Every RNG this rank draws from. On another world size the old ranks' streams mean
    nothing here: reseeded from the run seed, the step and the rank instead."""

    def __init__(self, *, rank: int, world_size: int, seed: int, progress: TrainProgress) -> None:
        self.key = f"rank_{rank}"
        self.rank, self.world_size, self.seed, self.progress = rank, world_size, seed, progress

    def state_dict(self) -> dict[str, Any]:
        return {self.key: get_rng_state()}

    def load_template(self, saved_world_size: int) -> dict[str, Any] | None:
        return self.state_dict() if saved_world_size == self.world_size else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            seed_everything(self.seed + 1_000_003 * self.progress.step + self.rank)
        else:
            set_rng_state(state[self.key])


class DataPosition(PerRankPart):
    """The training loader's position (stream and sampler state). Stored as a JSON string
    per rank: a leaf that loads whatever the world size, so a resume on another world size
    reads every old rank's position and remaps them (:func:`reshard_states`)."""

    def __init__(self, loader: Any, *, rank: int, world_size: int, readers_per_rank: int) -> None:
        self.loader = loader
        self.rank, self.world_size, self.readers_per_rank = rank, world_size, readers_per_rank
        self._saved_world_size = world_size

    def state_dict(self) -> dict[str, Any]:
        return {f"rank_{self.rank}": json.dumps(self.loader.state_dict())}

    def load_template(self, saved_world_size: int) -> dict[str, Any] | None:
        self._saved_world_size = saved_world_size
        if saved_world_size == self.world_size:
            return self.state_dict()
        return {f"rank_{r}": "" for r in range(saved_world_size)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        assert state is not None, "data positions are always in a checkpoint"
        if self._saved_world_size == self.world_size:
            self.loader.load_state_dict(json.loads(state[f"rank_{self.rank}"]))
            return
        old_states = [json.loads(state[f"rank_{r}"]) for r in range(self._saved_world_size)]
        new_states = reshard_states(old_states, world_size=self.world_size, readers_per_rank=self.readers_per_rank)
        self.loader.load_state_dict(new_states[self.rank])


def parts_state(parts: dict[str, Stateful | PerRankPart]) -> dict[str, Any]:
    """What the backend writes beside its own state: every part's state dict."""
    return {name: part.state_dict() for name, part in parts.items()}


def load_parts(parts: dict[str, Stateful | PerRankPart], read: Callable[[dict[str, Any]], None], *,
               saved_world_size: int) -> None:
    """Fill every part from a checkpoint: ``read(templates)`` loads the checkpoint into the
    templates in place (the backend's ``load``); parts are loaded in the dict's order (the
    RNG reseed of another world size needs the step)."""
    templates: dict[str, Any] = {}
    for name, part in parts.items():
        template = part.load_template(saved_world_size) if isinstance(part, PerRankPart) else part.state_dict()
        if template is not None:
            templates[name] = template
    read(templates)
    for name, part in parts.items():
        part.load_state_dict(templates.get(name))
