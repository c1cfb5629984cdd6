"""Per-rank entry points, started by torchrun: ``polytask train`` (build, train, close) and
``polytask eval`` (the model of the config, the weights of a checkpoint, the evaluation
library on ``eval.sources``)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from data_pipelines.bad_data import TooManyBadSamples
from data_pipelines.streaming.loader import load_label_space
from models import build_model
from trainer.backends import BACKENDS, load_model_weights
from trainer.checkpoint import Checkpointer, CheckpointLoadError, CheckpointSaveError
from trainer.checkpoint.compatibility import check_model_record
from trainer.config import JobConfig
from trainer.config_loading import ConfigError
from trainer.distributed import init_distributed, setup_rank_logging, shutdown_distributed
from trainer.evaluation.evaluator import eval_dir, evaluate
from trainer.train_loop import NonFiniteTrainingError, Trainer

log = logging.getLogger(__name__)


def run_training(cfg: JobConfig) -> int:
    setup_rank_logging(int(os.environ.get("RANK", 0)))
    # Quiet third-party loggers only where they are noisy per step.
    os.environ.setdefault("WANDB_SILENT", "true")
    dist_info = init_distributed(device=cfg.trainer.device, timeout_s=cfg.trainer.dist_timeout_s)
    log.info("world size %d, device %s", dist_info.world_size, dist_info.device)
    try:
        try:
            trainer = Trainer(cfg, dist_info)
        except CheckpointLoadError as e:  # a user error: the message says it all, no traceback
            log.error("%s", e)
            return 2
        try:
            trainer.train()
        except NonFiniteTrainingError as e:  # every rank stops here together; one line says why
            log.error("%s", e)
            trainer.close()
            return 3
        except CheckpointSaveError as e:  # e.g. disk full: the partial is gone, `latest` intact
            log.error("%s", e)
            trainer.close()
            return 4
        except TooManyBadSamples as e:  # judged over all ranks at a log line: all stop together
            log.error("%s", e)
            trainer.close()
            return 5
        if trainer.preempted:  # checkpointed for a Slurm requeue: unfinished, so no summary
            trainer.close()  # flush W&B; the requeued job continues the same run id
            return 0
        summary = trainer.finish()
        return 0 if summary["replicas_in_sync"] else 1
    finally:
        shutdown_distributed()


def run_eval(cfg: JobConfig, *, checkpoint: str | Path) -> int:
    """Evaluate ``checkpoint`` (DDP or DeepSpeed ZeRO 0-3, any world size that trained it)
    on ``eval.sources``; rank 0 prints the metrics as JSON, results go to
    ``<run.dir>/eval/step_<N>/``. One process evaluates alone; under torchrun the ranks
    share the images. Returns the exit code."""
    if not cfg.eval.enabled:
        raise ConfigError("eval.sources: no validation sources configured; nothing to evaluate")
    checkpoint = Path(checkpoint)
    meta = Checkpointer(run_dir=cfg.run.dir, cfg=cfg.checkpoint, is_main=False).read_meta(checkpoint)
    backend = meta.get("backend", "ddp")
    if backend not in BACKENDS:
        raise ConfigError(f"{checkpoint}: written by an unknown backend {backend!r}")
    setup_rank_logging(int(os.environ.get("RANK", 0)))
    dist_info = init_distributed(device=cfg.trainer.device, timeout_s=cfg.trainer.dist_timeout_s)
    try:
        # The label space of the training sources, as in training: it fixes the head sizes
        # and what the model's class indices mean.
        label_space = load_label_space(cfg.data, cfg.model.task_specs)[0]
        model = build_model(cfg.model, num_classes=label_space.num_classes(), tasks=label_space.tasks).to(dist_info.device)
        try:
            check_model_record(checkpoint, meta, label_space=label_space, model_cfg=cfg.model)
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
