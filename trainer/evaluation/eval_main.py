"""Per-rank entry of ``polytask eval CONFIG --checkpoint PATH``: the model of the config,
the weights of a checkpoint, the evaluation of ``eval.sources``.

One process evaluates alone; under torchrun (``torchrun --nproc-per-node N -m launcher eval
...``) the ranks share the images. Results go to ``<run.dir>/eval/step_<N>/``, N being the
checkpoint's step.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from data_pipelines.label_space import build_label_space
from data_pipelines.loader import load_manifests
from models import build_model
from trainer.checkpoint import Checkpointer, read_dcp
from trainer.config import JobConfig
from trainer.config_loading import ConfigError
from trainer.distributed import init_distributed, setup_rank_logging, shutdown_distributed
from trainer.evaluation.evaluator import eval_dir, evaluate

log = logging.getLogger(__name__)


def run_eval(cfg: JobConfig, *, checkpoint: str | Path) -> int:
    """Evaluate ``checkpoint``; rank 0 prints the metrics as JSON. Returns the exit code."""
    if not cfg.eval.enabled:
        raise ConfigError("eval.sources: no validation sources configured; nothing to evaluate")
    checkpoint = Path(checkpoint)
    meta = Checkpointer(run_dir=cfg.run.dir, cfg=cfg.checkpoint, is_main=False).read_meta(checkpoint)
    if meta.get("backend", "ddp") != "ddp":
        # ZeRO shards need DeepSpeed's zero_to_fp32, which unpickles with weights_only=False.
        raise ConfigError(
            f"{checkpoint}: written by the {meta['backend']!r} backend; `polytask eval` reads DDP (DCP) "
            f"checkpoints only for now"
        )
    setup_rank_logging(int(os.environ.get("RANK", 0)))
    dist_info = init_distributed(device=cfg.trainer.device, timeout_s=cfg.trainer.dist_timeout_s)
    try:
        # The label space of the training sources, as in training: it fixes the head sizes
        # and what the model's class indices mean.
        label_space = build_label_space(load_manifests(cfg.data))
        model = build_model(cfg.model, num_classes=label_space.num_classes()).to(dist_info.device)
        load_model_weights(model, checkpoint)
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


def load_model_weights(model: nn.Module, path: Path) -> None:
    """Load only the model from a DDP (DCP) checkpoint (collective).

    DCP reads just the keys asked for: the optimizer state is never read.
    """
    state = {"model": get_model_state_dict(model)}
    read_dcp(state, path)
    set_model_state_dict(model, state["model"])
    log.info("loaded model weights from %s", path)

