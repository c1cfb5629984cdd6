"""Host synchronisation census of the training step: every call that makes the host wait
for the device (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, ``nonzero``, boolean
indexing ...), counted per step and by where in polytask it is made.

The calls are seen through a ``TorchFunctionMode`` over ``Trainer.train_step`` on the demo
job (or any config given with ``--set``). With ``--device cuda`` only calls on CUDA tensors
are counted: those are the host syncs. On the CPU every such call is counted (there is no
device to wait for), so the table lists where syncs would be, including calls on tensors
that stay on the host by design (``Batch.image_sizes``, ``task_mask`` copies).

    .venv/bin/python -m bench.host_syncs [--steps 4] [--device cuda] [--set balancer.name=pcgrad ...]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from bench.demo_job import DEMO_CONFIG, demo_overrides, single_process_group  # noqa: E402
from data_pipelines.demo.shards import make_demo_shards  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.distributed import shutdown_distributed  # noqa: E402
from trainer.train_loop import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INSIDE_TORCH = "(inside torch)"
# Tensor methods whose result the host must have: each waits for the device's queue.
SYNCING = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy",
           "nonzero", "masked_select", "unique", "_local_scalar_dense"}


def _is_bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class SyncCensus(TorchFunctionMode):
    """Counts syncing calls by (call, polytask source line that made it)."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        # .to("cpu") syncs only from a device: on a CPU run it is a no-op and not counted.
        syncing = name in SYNCING or (name == "__getitem__" and _is_bool_index(args)) or (
            name == "to" and self.device_type != "cpu"
            and any(str(a) == "cpu" for a in [*args[1:], *(kwargs or {}).values()]))
        if syncing and self._on_device(args):
            self.counts[(name, self._caller())] += 1
        return func(*args, **(kwargs or {}))

    def _on_device(self, args: tuple) -> bool:
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return tensor is not None and tensor.device.type == self.device_type

    @staticmethod
    def _caller() -> str:
        """Where the call was made: the polytask source line, or "(inside torch)" when torch's
        own code made it (e.g. the optimizer reading its CPU step counters)."""
        here = Path(__file__).resolve()
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = Path(frame.filename).resolve()
            if path == here or path.name == "overrides.py":
                continue
            if path.is_relative_to(REPO) and ".venv" not in path.parts:
                return f"{path.relative_to(REPO)}:{frame.lineno} ({frame.name})"
            return INSIDE_TORCH
        return INSIDE_TORCH


def run(args: argparse.Namespace) -> collections.Counter:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = load_config(DEMO_CONFIG, demo_overrides(make_demo_shards(root), root / "run")
                          + ["trainer.max_steps=100000", f"trainer.device={args.device}", *args.set])
        dist_info = single_process_group(args.device)
        try:
            trainer = Trainer(cfg, dist_info)
            it = iter(trainer.loader)
            batches = [next(it) for _ in range(args.warmup + args.steps)]
            for b in batches[: args.warmup]:  # first-call costs and lazy set-up are not the step's
                trainer.train_step([b])
            census = SyncCensus(dist_info.device.type)
            with census:
                for b in batches[args.warmup:]:
                    trainer.train_step([b])
            trainer.close()
        finally:
            shutdown_distributed()
    return census.counts


def print_census(counts: collections.Counter, steps: int, device: str) -> None:
    total = sum(counts.values())
    own = sum(n for (_, where), n in counts.items() if where != INSIDE_TORCH)
    print(f"Host-sync calls per train step on {device} ({steps} steps): {total / steps:.1f}, "
          f"made by polytask's code: {own / steps:.1f}"
          + ("" if device == "cuda" else " (CPU: every such call, not only those on a device)"))
    print(f"{'per step':>8s}  {'call':16s} where")
    for (name, where), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{n / steps:8.2f}  {name:16s} {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps counted")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first, not counted")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides of the demo job, e.g. balancer.name=pcgrad trainer.precision=bf16")
    args = parser.parse_args()
    counts = run(args)
    print_census(counts, args.steps, args.device)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
