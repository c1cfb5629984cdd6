"""Distributed evaluation: every rank predicts its share, rank 0 scores and writes, every
rank returns the same metrics.

Output (rank 0) in ``out_dir``::

    <source>_<iou_type>_results.json   standard COCO results (original ids and pixels)
    <source>_classification_predictions.jsonl   one line per image: image id, file name, true
                                       class, top-5 classes with probabilities, correct
    <source>_classification_confusion.json      {"classes", "matrix"}: images per true class
                                       (row) and top-1 prediction (column)
    summary.json                       every metric; per source the ground-truth json and
                                       COCOeval params each results file was scored with,
                                       and the OKS sigmas of keypoint sources
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data_pipelines.label_space import LabelSpace
from data_pipelines.streaming.config import TransformConfig
from trainer.evaluation.accumulator import SourceAccumulator
from trainer.evaluation.coco_metrics import CocoEvalParams, coco_stats, load_ground_truth
from trainer.evaluation.config import EvalConfig
from trainer.evaluation.dense_metrics import (
    class_confusion,
    classification_scores,
    semantic_scores,
    source_classes,
)
from trainer.evaluation.eval_sources import load_eval_manifests, map_eval_sources
from data_pipelines.streaming.eval_loader import build_eval_loader, expected_images
from trainer.evaluation.source_spec import SourceSpec, source_spec

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"


def eval_dir(run_dir: str | Path, step: int) -> Path:
    """Where the evaluation of step ``step`` goes: ``<run.dir>/eval/step_<N>/``."""
    return Path(run_dir) / "eval" / f"step_{step}"


def evaluate(
    model: nn.Module,
    cfg: EvalConfig,
    *,
    transforms: TransformConfig,
    label_space: LabelSpace,
    rank: int,
    world_size: int,
    device: torch.device,
    out_dir: str | Path,
    step: int | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on ``cfg.sources``; collective when ``world_size`` > 1.

    Args:
        model: the unwrapped ``MultiTaskModel`` (``backend.module``): only its ``heads`` (which
            tasks it predicts) and ``predict`` are used; its train/eval mode is restored.
        cfg: the ``eval`` config section.
        transforms: the training transform config (evaluation resizes as it does, at scale 1).
        label_space: the label space of the training sources, which the model's outputs index.
        rank, world_size: this process in the default process group.
        device: where the model is.
        out_dir: where rank 0 writes results and ``summary.json`` (created).
        step: training step, recorded in the summary.

    Returns:
        ``{"val/<source>/<bbox|segm|keypoints>/<AP|AP50|...>", "val/<source>/semantic/<mIoU|pixel_acc>",
        "val/<source>/<classification task>/<top1|top5>": value, "eval/images", "eval/seconds",
        "eval/images_per_s"}``, the same dict on every rank.
    """
    started = time.perf_counter()
    space, manifests = map_eval_sources(label_space, load_eval_manifests(cfg), cfg.sources)
    specs = {m.name: source_spec(m, space) for m in manifests}
    loader = build_eval_loader(
        manifests, label_space=space, transforms=transforms, rank=rank, world_size=world_size,
        batch_size=cfg.batch_size, num_workers=cfg.num_workers, max_images=cfg.max_images,
    )
    local = {name: SourceAccumulator() for name in specs}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch, records in loader:
                # Only the heads these sources are scored on (the cascades cost the most).
                tasks = {t for record in records for t in specs[record.source].tasks}
                # Each image's own resized size: short_side batches are padded to their largest.
                image_sizes = [(int(h), int(w)) for h, w in batch.image_sizes.tolist()]
                outputs = model.predict(batch.images.to(device, non_blocking=True), tasks=sorted(tasks),
                                        image_sizes=image_sizes)
                for output, record, input_size in zip(outputs, records, image_sizes):
                    local[record.source].add(output, record, spec=specs[record.source], input_size=input_size)
    finally:
        model.train(was_training)

    per_rank = _gather_to_main(local, rank=rank, world_size=world_size)
    outcome: tuple[dict[str, float] | None, str | None] = (None, None)
    if rank == 0:
        try:
            merged = {name: SourceAccumulator.merge([r[name] for r in per_rank]) for name in specs}
            _check_exactly_once(merged, expected_images(manifests, max_images=cfg.max_images))
            metrics = _score_and_write(merged, specs, out_dir=Path(out_dir), step=step, started=started)
            outcome = (metrics, None)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below, so none waits forever
            outcome = (None, f"{type(e).__name__}: {e}")
            log.exception("evaluation failed on rank 0")
    metrics, error = _broadcast_from_main(outcome, rank=rank, world_size=world_size)
    if error is not None:
        raise RuntimeError(f"evaluation failed on rank 0: {error}")
    assert metrics is not None
    return metrics


def _gather_to_main(obj: Any, *, rank: int, world_size: int) -> list[Any]:
    """Every rank's ``obj`` on rank 0 (rank order); an empty list elsewhere."""
    if world_size == 1:
        return [obj]
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered or []


def _broadcast_from_main(obj: Any, *, rank: int, world_size: int) -> Any:
    if world_size == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_exactly_once(merged: dict[str, SourceAccumulator], expected: dict[str, int]) -> None:
    for name, acc in merged.items():
        repeated = sorted(i for i, n in Counter(acc.image_ids).items() if n > 1)
        if repeated:
            raise RuntimeError(f"source {name!r}: image id(s) {repeated[:10]} were evaluated more than once")
        if len(acc.image_ids) != expected[name]:
            raise RuntimeError(f"source {name!r}: {len(acc.image_ids)} images evaluated, expected {expected[name]}")


def _score_and_write(
    merged: dict[str, SourceAccumulator],
    specs: dict[str, SourceSpec],
    *,
    out_dir: Path,
    step: int | None,
    started: float,
) -> dict[str, float]:
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    sources: dict[str, dict] = {}
    for name, acc in merged.items():
        spec = specs[name]
        scores, sources[name] = _score_coco(acc, spec, out_dir=out_dir)
        if spec.semantic_classes is not None:
            side = spec.num_semantic_classes
            confusion = acc.confusion if acc.confusion is not None else torch.zeros(side, side, dtype=torch.int64)
            scores["semantic"] = semantic_scores(confusion, classes=spec.semantic_classes)
        for task in spec.image_classes:  # keyed by the classification task's name
            scores[task] = classification_scores(acc.classifications.get(task, []))
            sources[name].update(_write_classifications(acc, spec, task, out_dir=out_dir))
        for task, values in scores.items():
            metrics.update({f"val/{name}/{task}/{k}": v for k, v in values.items()})
    seconds = time.perf_counter() - started
    images = sum(len(acc.image_ids) for acc in merged.values())
    metrics.update({"eval/images": float(images), "eval/seconds": seconds, "eval/images_per_s": images / seconds})
    summary = {"step": step, "metrics": metrics, "sources": sources}
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    log.info("evaluation: %d images in %.1f s, results in %s", images, seconds, out_dir)
    return metrics


def _write_classifications(acc: SourceAccumulator, spec: SourceSpec, task: str, *, out_dir: Path) -> dict[str, str]:
    """Per-image predictions and the confusion matrix of one classification task of a source,
    by class name; returns the summary entries naming the files."""
    names = spec.image_class_names[task]
    records = sorted(acc.classifications.get(task, []), key=lambda r: r["image_id"])
    lines = [
        json.dumps({
            "image_id": r["image_id"], "file_name": r["file_name"], "label": names[r["label"]],
            "prediction": names[r["top"][0]], "correct": r["top"][0] == r["label"],
            "top5": [{"class": names[c], "score": p} for c, p in zip(r["top"], r["scores"])],
        })
        for r in records
    ]
    predictions = out_dir / f"{spec.name}_{task}_predictions.jsonl"
    predictions.write_text("".join(line + "\n" for line in lines))
    matrix = class_confusion([r["label"] for r in records], [r["top"][0] for r in records],
                             classes=spec.image_classes[task])
    confusion = out_dir / f"{spec.name}_{task}_confusion.json"
    classes = [names[c] for c in source_classes(spec.image_classes[task])]
    confusion.write_text(json.dumps({"source": spec.name, "task": task, "classes": classes, "matrix": matrix,
                                     "rows": "true class", "columns": "top-1 prediction"}))
    return {f"{task}_predictions": predictions.name, f"{task}_confusion": confusion.name}


def _score_coco(acc: SourceAccumulator, spec: SourceSpec, *, out_dir: Path) -> tuple[dict[str, dict], dict]:
    """COCO stats per iou type, and the source's summary entry (what was scored against what)."""
    info: dict[str, Any] = {"num_images": len(acc.image_ids)}
    scores: dict[str, dict] = {}
    if not spec.iou_types:
        return scores, info
    assert spec.annotation_file is not None  # source_spec guarantees it
    if not Path(spec.annotation_file).is_file():  # present at start-up (preflight), gone since
        raise FileNotFoundError(
            f"validation source {spec.name!r}: its ground truth {spec.annotation_file} does not exist"
        )
    gt = load_ground_truth(spec.annotation_file)
    info.update(ground_truth={}, results={}, cocoeval_params={})
    for iou_type in spec.iou_types:
        path = out_dir / f"{spec.name}_{iou_type}_results.json"
        # Scored from the file, as anyone re-running pycocotools on it will.
        path.write_text(json.dumps(acc.coco.get(iou_type, [])))
        keypoints = iou_type == "keypoints"
        params = CocoEvalParams(
            image_ids=sorted(acc.image_ids),
            # Keypoint AP is over the categories that have keypoints; the rest have no OKS.
            category_ids=list(spec.keypoint_category_ids) if keypoints else sorted(gt.getCatIds()),
            kpt_oks_sigmas=spec.kpt_oks_sigmas if keypoints else None,
        )
        scores[iou_type] = coco_stats(gt, path, iou_type, params=params)
        info["ground_truth"][iou_type] = spec.annotation_file
        info["results"][iou_type] = path.name
        info["cocoeval_params"][iou_type] = asdict(params)
        if keypoints:
            info["kpt_oks_sigmas"] = params.kpt_oks_sigmas
    return scores, info
