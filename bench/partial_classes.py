"""Partial class annotation: the class-aware loss vs the all-negative one, per class.

The demo's keypoint images also hold circles, squares and triangles that the keypoint
source (which annotates figures only) leaves unlabelled; the instance source annotates
them. ``model.unannotated_classes: ignore`` (the default) gives those classes no loss on the
keypoint source's samples; ``negative`` trains them as background there, as a naive merge
of the label spaces does. Each mode trains the demo job (one process) for each seed, then
scores box AP per class on the source that annotates the classes (shapes_instances, val),
with pycocotools restricted to one category at a time, and the figure class on its own
source. Printed: mean ± std over the seeds per class, and the difference.

    .venv/bin/python -m bench.partial_classes [--steps 300] [--seeds 0 1] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.demo_job import DEMO_CONFIG, demo_overrides, single_process_group
from data_pipelines.demo.shards import make_demo_shards
from trainer.config import load_config
from trainer.distributed import DistInfo, shutdown_distributed
from trainer.evaluation.evaluator import eval_dir
from trainer.train_loop import Trainer

MODES = ("ignore", "negative")
# (validation source, what it annotates of the thing classes): each class is scored where it is labelled.
SCORED = ("shapes_instances", "shapes_keypoints")


def per_class_ap(ground_truth: Path, results: Path) -> dict[str, tuple[float, float]]:
    """COCO box AP (IoU .50:.95) and AP50 of each category, evaluated alone; a class without
    any detection scores 0."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        gt = COCO(str(ground_truth))
        detections = json.loads(results.read_text())
        dt = gt.loadRes(detections) if detections else None
        out = {}
        for cat in gt.loadCats(gt.getCatIds()):
            if dt is None:
                out[cat["name"]] = (0.0, 0.0)
                continue
            ev = COCOeval(gt, dt, "bbox")
            ev.params.catIds = [cat["id"]]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[cat["name"]] = (max(float(ev.stats[0]), 0.0), max(float(ev.stats[1]), 0.0))  # -1: no ground truth
    return out


def train_and_score(shards: Path, run_dir: Path, dist_info: DistInfo, *, mode: str, seed: int,
                    steps: int) -> dict[str, float]:
    val = {name: shards / "val" / name for name in SCORED}
    overrides = demo_overrides(shards, run_dir) + [
        f"model.unannotated_classes={mode}", f"run.seed={seed}", f"data.seed={seed}", f"trainer.max_steps={steps}",
        "eval.sources=[" + ", ".join("{path: %s}" % p for p in val.values()) + "]", "eval.max_images=null",
        f"checkpoint.every={steps}",
    ]
    trainer = Trainer(load_config(DEMO_CONFIG, overrides), dist_info)
    trainer.train()
    summary = trainer.finish()
    out_dir = eval_dir(run_dir, summary["step"])
    scores = {}
    for name, path in val.items():
        for cls, (ap, ap50) in per_class_ap(path / "annotations.json", out_dir / f"{name}_bbox_results.json").items():
            scores[f"{cls} ({name}) AP"] = ap
            scores[f"{cls} ({name}) AP50"] = ap50
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (the demo's: 300)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", default="runs/bench_partial_classes", help="per-run results (json) go here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_demo_shards(root)
        dist_info = single_process_group()
        try:
            for seed in args.seeds:
                for mode in MODES:
                    print(f"{mode} seed {seed}: training {args.steps} steps ...", file=sys.stderr, flush=True)
                    scores = train_and_score(shards, root / f"{mode}_{seed}", dist_info, mode=mode, seed=seed,
                                             steps=args.steps)
                    (out / f"{mode}_seed{seed}_steps{args.steps}.json").write_text(json.dumps(scores, indent=2))
                    results[mode].append(scores)
        finally:
            shutdown_distributed()
    print(f"box AP (.50:.95) and AP50 per class, {args.steps} steps, seeds {args.seeds} (mean ± std); the shapes are unannotated "
          f"in shapes_keypoints' images")
    print(f"{'class (scored on) metric':40} {'ignore (class-aware)':>22} {'negative (all-negative)':>24} {'difference':>11}")
    for key in results[MODES[0]][0]:
        cells = []
        for mode in MODES:
            values = [r[key] for r in results[mode]]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append((statistics.fmean(values), std))
        (a, sa), (b, sb) = cells
        print(f"{key:40} {a:>14.3f} ± {sa:.3f} {b:>16.3f} ± {sb:.3f} {a - b:>+11.3f}")


if __name__ == "__main__":
    main()
