"""What plain pycocotools scores on a results file: the reference the evaluator must equal."""
from __future__ import annotations

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def pycocotools_stats(annotation_file, results_file, iou_type, sigmas=None) -> list[float]:
    """``COCOeval(gt, dt, iou_type)`` with its defaults (OKS sigmas too, unless given): its 10-12 stats."""
    gt = COCO(str(annotation_file))
    evaluator = COCOeval(gt, gt.loadRes(str(results_file)), iou_type)
    if sigmas is not None:
        evaluator.params.kpt_oks_sigmas = np.array(sigmas)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return [float(s) for s in evaluator.stats]
