"""Per-rank entry of ``polytask eval CONFIG --checkpoint PATH``: the model of the config,
the weights of a checkpoint, the evaluation of ``eval.sources``.

One process evaluates alone; under torchrun (``torchrun --nproc-per-node N -m launcher eval
...``) the ranks share the images. Results go to ``<run.dir>/eval/step_<N>/``, N being the
checkpoint's step.

Checkpoints of either backend: DDP (DCP, only the model's keys are read) and DeepSpeed ZeRO
0-3 (the full weights from DeepSpeed's files, consolidated for ZeRO-3), whatever world size
trained them; files are loaded weights-only.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from data_pipelines.label_space import build_label_space
from data_pipelines.loader import load_manifests
from models import build_model
from trainer.checkpoint import Checkpointer, CheckpointLoadError, mismatch_error, read_dcp
from trainer.config import JobConfig
from trainer.config_loading import ConfigError
from trainer.distributed import init_distributed, setup_rank_logging, shutdown_distributed
from trainer.evaluation.evaluator import eval_dir, evaluate
from trainer.weights_digest import weights_digest

log = logging.getLogger(__name__)


def run_eval(cfg: JobConfig, *, checkpoint: str | Path) -> int:
    """Evaluate ``checkpoint``; rank 0 prints the metrics as JSON. Returns the exit code."""
    if not cfg.eval.enabled:
        raise ConfigError("eval.sources: no validation sources configured; nothing to evaluate")
    checkpoint = Path(checkpoint)
    meta = Checkpointer(run_dir=cfg.run.dir, cfg=cfg.checkpoint, is_main=False).read_meta(checkpoint)
    backend = meta.get("backend", "ddp")
    if backend not in ("ddp", "deepspeed"):
        raise ConfigError(f"{checkpoint}: written by an unknown backend {backend!r}")
    setup_rank_logging(int(os.environ.get("RANK", 0)))
    dist_info = init_distributed(device=cfg.trainer.device, timeout_s=cfg.trainer.dist_timeout_s)
    try:
        # The label space of the training sources, as in training: it fixes the head sizes
        # and what the model's class indices mean.
        label_space = build_label_space(load_manifests(cfg.data))
        model = build_model(cfg.model, num_classes=label_space.num_classes()).to(dist_info.device)
        try:
            load_model_weights(model, checkpoint, backend=backend)
        except CheckpointLoadError as e:  # a user error: the message says it all, no traceback
            log.error("%s", e)
            return 2
        step = int(meta["step"])
        metrics = evaluate(
            model, cfg.eval, transforms=cfg.data.transforms, label_space=label_space,
            rank=dist_info.rank, world_size=dist_info.world_size, device=dist_info.device,
            out_dir=eval_dir(cfg.run.dir, step), step=step,
        )
        if dist_info.is_main:
            print(json.dumps({"step": step, **metrics}, indent=2))
        return 0
    finally:
        shutdown_distributed()


def load_model_weights(model: nn.Module, path: Path, *, backend: str = "ddp") -> None:
    """Load only the model from a checkpoint of ``backend`` (collective for DDP checkpoints).

    DDP: DCP reads just the keys asked for, the optimizer state is never read. DeepSpeed:
    every rank reads the files itself, so any number of ranks can evaluate any checkpoint.
    """
    if backend == "deepspeed":
        from trainer.backends.deepspeed_checkpoint import zero_model_state_dict

        load_full_state_dict(model, zero_model_state_dict(path), path)
    else:
        state = {"model": get_model_state_dict(model)}
        read_dcp(state, path)
        set_model_state_dict(model, state["model"])
    log.info("loaded model weights from %s (%s backend), sha256 %s", path, backend, weights_digest(model.state_dict()))


def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)``, with one error listing every mismatching key first."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shape = sorted(
        f"{k}: checkpoint {list(state[k].shape)} vs job {list(v.shape)}"
        for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or shape:
        raise mismatch_error(path, missing=missing, shape=shape, unexpected=unexpected)
    model.load_state_dict(state)


