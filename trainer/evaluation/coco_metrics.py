"""pycocotools COCOeval on a results json against the source's original annotation file."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger(__name__)

# Names of COCOeval.stats, in order (see COCOeval.summarize).
_BOX_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
STAT_NAMES: dict[str, tuple[str, ...]] = {
    "bbox": _BOX_STATS,
    "segm": _BOX_STATS,
    "keypoints": ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"),
}


@dataclass(frozen=True, kw_only=True)
class CocoEvalParams:
    """The COCOeval.params a run sets besides the defaults; recorded so others can re-run it."""

    image_ids: list[int]
    category_ids: list[int]
    kpt_oks_sigmas: list[float] | None = None  # keypoints only: the source's own sigmas


def load_ground_truth(path: str | Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(path))


def coco_stats(gt: COCO, results_file: str | Path, iou_type: str, *, params: CocoEvalParams) -> dict[str, float]:
    """COCOeval's summary stats by name (-1 where the ground truth has nothing to score)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluator = COCOeval(gt, _load_results(gt, results_file), iou_type)
        evaluator.params.imgIds = sorted(params.image_ids)
        evaluator.params.catIds = sorted(params.category_ids)
        if params.kpt_oks_sigmas is not None:
            evaluator.params.kpt_oks_sigmas = np.array(params.kpt_oks_sigmas)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("%s %s:\n%s", results_file, iou_type, printed.getvalue())
    return dict(zip(STAT_NAMES[iou_type], (float(s) for s in evaluator.stats)))


def _load_results(gt: COCO, results_file: str | Path) -> COCO:
    with open(results_file) as f:
        results = json.load(f)
    if results:
        return gt.loadRes(results)
    # loadRes cannot take an empty list (it reads results[0]); no detections score 0.
    empty = COCO()
    empty.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
    empty.createIndex()
    return empty
