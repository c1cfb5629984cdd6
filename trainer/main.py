"""Per-rank entry point (``polytask train``), started by torchrun: parse, build, train, close."""
from __future__ import annotations

import logging
import os

from data_pipelines.bad_data import TooManyBadSamples
from trainer.checkpoint import CheckpointLoadError, CheckpointSaveError
from trainer.config import JobConfig
from trainer.distributed import init_distributed, setup_rank_logging, shutdown_distributed
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
