"""Reading DeepSpeed checkpoint files without a DeepSpeed engine, never running code from them.

Our layout: ``<step dir>/deepspeed/state/`` (DeepSpeed's ``save_checkpoint`` with tag
``state``). Every file is read with ``torch.load(weights_only=True)`` and the few plain-data
DeepSpeed classes they hold allow-listed by name (:func:`safe_globals`), the one allow-list
for the trainer's checkpoint engine and for this module.

:func:`zero_model_state_dict` gives the full model state dict of a ZeRO 0-3 checkpoint, on any
number of processes (each reads the files itself; no collectives), e.g. for ``polytask eval``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import CheckpointLoadError

log = logging.getLogger(__name__)

TAG = "state"  # one checkpoint per directory: our step_<N> is the tag already
_MODEL_FILE = "mp_rank_00_model_states.pt"  # ZeRO 0-2: the whole module, on rank 0
_RANK_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_(model|optim)_states\.pt$")


def state_dir(checkpoint: str | Path) -> Path:
    """Where :class:`DeepSpeedBackend` writes DeepSpeed's files inside a step directory."""
    return Path(checkpoint) / "deepspeed" / TAG


def safe_globals() -> list[Any]:
    """The non-torch classes DeepSpeed's checkpoint files hold (found by loading ZeRO 0-3
    checkpoints and their universal conversions): plain data, safe to rebuild in a weights-only load."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def allowed_globals() -> Iterator[None]:
    """:func:`safe_globals` allowed in weights-only loads. Unlike torch's context manager it
    removes on exit only what it added, so nested uses leave the outer one intact."""
    added = [g for g in safe_globals() if g not in torch.serialization.get_safe_globals()]
    torch.serialization.add_safe_globals(added)
    try:
        yield
    finally:
        keep = [g for g in torch.serialization.get_safe_globals() if g not in added]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(keep)


def load_file(path: str | Path, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` of one DeepSpeed checkpoint file, weights only."""
    with allowed_globals():
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def zero_model_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The model's full state dict from a DeepSpeed checkpoint written by any world size.

    ZeRO 0/1/2: the ``module`` entry of ``mp_rank_00_model_states.pt`` (the weights the
    model ran with: bf16 under ``trainer.precision=bf16``). ZeRO-3: parameters are
    partitioned, so the fp32 weights are consolidated from every rank's optimizer file by
    DeepSpeed's own ``zero_to_fp32`` merge, fed with files we loaded weights-only.
    """
    directory = state_dir(checkpoint)
    if not directory.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no DeepSpeed checkpoint ({directory} is missing)")
    try:
        if (directory / _MODEL_FILE).is_file():
            return dict(load_file(directory / _MODEL_FILE, mmap=True)["module"])  # not the rest (ZeRO-0: optimizer)
        return _consolidate_zero3(directory)
    except pickle.UnpicklingError as e:  # an object outside the allow-list: refused, not run
        why = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), "")
        raise CheckpointLoadError(f"{checkpoint}: cannot load: Weights only load failed. {why.split('. ')[0]}") from None


def _rank_files(directory: Path, kind: str) -> list[Path]:
    found = {int(m.group(1)): p for p in directory.iterdir() if (m := _RANK_FILE.match(p.name)) and m.group(2) == kind}
    if not found or sorted(found) != list(range(len(found))):
        raise FileNotFoundError(f"{directory}: expected zero_pp_rank_<0..N-1>_mp_rank_00_{kind}_states.pt, "
                                f"found ranks {sorted(found)}")
    return [found[r] for r in range(len(found))]


def _consolidate_zero3(directory: Path) -> dict[str, torch.Tensor]:
    from deepspeed.checkpoint import constants as c
    from deepspeed.utils import zero_to_fp32

    model_states = []
    for path in _rank_files(directory, "model"):
        sd = load_file(path)
        buffer_names = set(sd[c.BUFFER_NAMES])
        model_states.append(zero_to_fp32.zero_model_state(
            buffers={k: v.float() if v.is_floating_point() else v for k, v in sd["module"].items() if k in buffer_names},
            param_shapes=sd[c.PARAM_SHAPES], shared_params=list(map(list, sd["shared_params"].items())),
            ds_version=sd.get(c.DS_VERSION), frozen_param_shapes=sd.get(c.FROZEN_PARAM_SHAPES),
            frozen_param_fragments=sd.get(c.FROZEN_PARAM_FRAGMENTS),
        ))
    flat_groups = []
    for path in _rank_files(directory, "optim"):
        optim = load_file(path, mmap=True)[c.OPTIMIZER_STATE_DICT]
        if int(optim[c.ZERO_STAGE]) != 3:
            raise CheckpointLoadError(f"{path}: ZeRO stage {int(optim[c.ZERO_STAGE])} without {_MODEL_FILE}")
        if optim[c.PARTITION_COUNT] != len(model_states):
            raise CheckpointLoadError(f"{directory}: written by {optim[c.PARTITION_COUNT]} ranks, "
                             f"{len(model_states)} rank files found")
        flat_groups.append(optim[c.FP32_FLAT_GROUPS])  # Adam moments (optimizer_state_dict) never touched
    # zero_to_fp32 prints progress on stdout, which `polytask eval` keeps for its JSON.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), torch.no_grad():  # the flat groups were saved requiring grad
        lazy = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(
            len(flat_groups), flat_groups, model_states, exclude_frozen_parameters=False)
        state = zero_to_fp32.to_torch_tensor(lazy)
    report = " / ".join(line for line in printed.getvalue().splitlines() if line)
    log.info("ZeRO-3 weights consolidated from %d ranks: %s", len(flat_groups), report)
    return state
