"""What the launcher checks before torchrun spawns a process: the data sources and the
evaluation set-up, with the validation functions the ranks themselves call, so a problem
reads the same whether the launcher or a rank finds it.

- training sources: their manifests load, the label spaces merge (one keypoint layout),
  every source has a sample (one smaller than the reader slots, world size x
  ``data.readers_per_rank``, is dealt out several epochs at a time): the ranks' own
  :func:`build_train_loader`, which starts no process;
- evaluation sources: manifests load, map into the training label space, and their
  ground-truth files exist (:func:`eval_source_specs`, also called by every rank at start-up);
- ``eval.best_metric`` names a metric the run evaluates (:func:`check_best_metric`);
- the checkpoint the ranks would resume from fits the model and the training sources (its
  ``meta.json`` record: :func:`check_model_record`, which every rank calls again).

Each problem is one line; independent problems are all reported.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from data_pipelines.label_space import LabelSpace
from data_pipelines.streaming.loader import build_train_loader
from data_pipelines.tasks import check_cascades
from trainer.checkpoint import META_NAME, Checkpointer, CheckpointLoadError
from trainer.checkpoint.compatibility import check_model_record
from trainer.config import JobConfig, check_loss_weights
from trainer.evaluation.best_metric import check_best_metric
from trainer.evaluation.config import EvalConfig
from trainer.evaluation.eval_sources import load_eval_manifests, map_eval_sources
from trainer.evaluation.source_spec import SourceSpec, source_spec

T = TypeVar("T")


def preflight_problems(cfg: JobConfig, *, world_size: int) -> list[str]:
    """One line per problem found in ``cfg``'s data and evaluation set-up; [] when none."""
    problems: list[str] = []

    def attempt(check: Callable[[], T]) -> T | None:
        try:
            return check()
        except (ValueError, FileNotFoundError, KeyError, CheckpointLoadError) as e:
            problems.append(_one_line(e))
            return None

    built = attempt(lambda: build_train_loader(cfg.data, tasks=cfg.model.task_specs, rank=0, world_size=world_size))
    if not cfg.eval.sources:
        attempt(lambda: check_best_metric(cfg.eval, {}))
    elif built is None:  # without the training label space, the manifests are what can be checked
        attempt(lambda: load_eval_manifests(cfg.eval))
    else:
        _, label_space, _ = built
        specs = attempt(lambda: eval_source_specs(cfg.eval, label_space=label_space))
        if specs is not None:
            attempt(lambda: check_best_metric(cfg.eval, specs))
    if built is not None:
        attempt(lambda: check_cascades(built[1].tasks))
        attempt(lambda: check_loss_weights(cfg.trainer.loss_weights, built[1].task_names))
        attempt(lambda: check_resume_checkpoint(cfg, built[1]))
    return problems


def check_resume_checkpoint(cfg: JobConfig, label_space: LabelSpace) -> None:
    """CheckpointLoadError when the checkpoint ``checkpoint.resume`` picks does not fit the
    config's model and training sources (nothing to check for a fresh run)."""
    checkpointer = Checkpointer(run_dir=cfg.run.dir, cfg=cfg.checkpoint, is_main=False)
    path = checkpointer.resume_path()
    # A named checkpoint that is not there (or incomplete) is the ranks' to report, as a
    # resume failure (a Slurm job then ends FAILED, not requeued).
    if path is not None and (path / META_NAME).is_file():
        check_model_record(path, checkpointer.read_meta(path), label_space=label_space, model_cfg=cfg.model)


def eval_source_specs(cfg: EvalConfig, *, label_space: LabelSpace) -> dict[str, SourceSpec]:
    """What each validation source is scored on, as the evaluator works it out, after checking
    that the COCO ground truth it scores against is there (rather than after training)."""
    space, manifests = map_eval_sources(label_space, load_eval_manifests(cfg), cfg.sources)
    specs = {}
    for i, (source, manifest) in enumerate(zip(cfg.sources, manifests)):
        try:
            spec = source_spec(manifest, space)  # reads the ground truth of keypoint sources
        except FileNotFoundError as e:
            raise FileNotFoundError(_no_ground_truth(i, source.path, manifest.name, e.filename)) from None
        if spec.annotation_file is not None and not Path(spec.annotation_file).is_file():
            raise FileNotFoundError(_no_ground_truth(i, source.path, manifest.name, spec.annotation_file))
        specs[manifest.name] = spec
    return specs


def _no_ground_truth(index: int, path: str, name: str, missing: str | None) -> str:
    return (f"eval.sources[{index}].path: validation source {name!r} ({path}) is scored against "
            f"{missing}, which does not exist (re-run `polytask data convert coco` to restore it)")


def _one_line(error: BaseException) -> str:
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split())
