"""Resuming a ZeRO checkpoint on another world size, through DeepSpeed's universal checkpoint.

ZeRO-1/2/3 partition the optimizer state (ZeRO-3 the weights too) by world size, and
DeepSpeed loads such a checkpoint only on the world size that wrote it. Its universal format
(per parameter: fp32 weights, exp_avg, exp_avg_sq, step) loads on any world size with
``checkpoint.load_universal``. :func:`universal_copy` converts a checkpoint once, into
``<step dir>/deepspeed_universal/`` (renamed into place when complete, pruned with the step).

DeepSpeed's converter and its universal loader call ``torch.load(weights_only=False)``; we
force every such load to weights-only with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` and the
allow-list of :mod:`trainer.backends.deepspeed_checkpoint`. The converter runs in a
subprocess: it prints a lot, keeps module-level state and the forcing then stays out of
the training process.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.backends.deepspeed_checkpoint import TAG, allowed_globals, safe_globals, state_dir
from trainer.checkpoint import CheckpointLoadError

log = logging.getLogger(__name__)

UNIVERSAL_DIR = "deepspeed_universal"
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def saved_world_size(checkpoint: str | Path) -> int | None:
    """How many ranks share the checkpoint's ZeRO partitions; None for ZeRO-0 (nothing
    partitioned: the optimizer state is whole in the model-states file)."""
    ranks = [p for p in state_dir(checkpoint).iterdir() if _OPTIM_FILE.match(p.name)]
    return len(ranks) or None


def universal_copy(checkpoint: str | Path) -> Path:
    """The universal conversion of ``checkpoint`` (made now if missing): a directory for
    ``engine.load_checkpoint(dir, tag=TAG)``. Call it on one rank; the others wait."""
    checkpoint = Path(checkpoint)
    out = checkpoint / UNIVERSAL_DIR
    if (out / TAG).is_dir():
        return out
    partial = checkpoint / f"{UNIVERSAL_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a conversion that was killed
    log.info("converting %s to DeepSpeed's universal checkpoint (world size change)", checkpoint)
    proc = subprocess.run(
        [sys.executable, "-m", __name__, str(state_dir(checkpoint)), str(partial / TAG)],
        env={**os.environ, _FORCE: "1"}, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise CheckpointLoadError(f"{checkpoint}: conversion to DeepSpeed's universal checkpoint failed:\n{tail}")
    os.replace(partial, out)
    return out


@contextlib.contextmanager
def universal_load(engine: Any) -> Iterator[None]:
    """Within: ``engine.load_checkpoint`` reads a universal checkpoint, weights-only."""
    before = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"  # DeepSpeed's universal loader passes weights_only=False itself
    engine._config.load_universal_checkpoint = True  # read at load time only
    try:
        with allowed_globals():
            yield
    finally:
        engine._config.load_universal_checkpoint = False
        if before is None:
            os.environ.pop(_FORCE)
        else:
            os.environ[_FORCE] = before


def _convert(argv: list[str]) -> None:
    """``python -m trainer.backends.deepspeed_universal IN_DIR OUT_DIR`` (with _FORCE set)."""
    import torch

    if os.environ.get(_FORCE) != "1":
        raise SystemExit(f"{_FORCE}=1 must be set: the converter unpickles with weights_only=False")
    torch.serialization.add_safe_globals(safe_globals())
    from deepspeed.checkpoint import ds_to_universal

    input_folder, output_folder = argv
    ds_to_universal.main(argparse.Namespace(
        input_folder=input_folder, output_folder=output_folder, num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True,
        # Our checkpoints carry no UNIVERSAL_CHECKPOINT_INFO (tensor/pipeline-parallel merge
        # patterns, which plain data parallelism does not need); the converter adds the version.
        inject_missing_state=True,
    ))


if __name__ == "__main__":
    _convert(sys.argv[1:])
