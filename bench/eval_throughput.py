"""Evaluation throughput on the demo validation split vs the model's bare forward.

``evaluate`` (decode + resize, ``predict``, mapping to COCO results, RLE encoding,
COCOeval, dense metrics, summary files) against ``model.predict`` alone on the same,
already decoded batches; one process. Rounds alternate between the two so that machine
noise hits both alike; medians and their ratio are printed.

    .venv/bin/python -m bench.eval_throughput [--checkpoint RUN/checkpoints/latest] [--rounds 3]

Without ``--checkpoint`` the model is untrained: it detects next to nothing, which makes
the mask/keypoint cascades and the COCO work unrealistically cheap. Pass the demo run's
checkpoint (trained with the same config) for representative numbers.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.demo_job import DEMO_CONFIG, demo_overrides, single_process_group
from data_pipelines.demo.shards import make_demo_shards
from data_pipelines.demo.synthetic import DEMO_TASKS
from data_pipelines.streaming.eval_loader import build_eval_loader
from data_pipelines.streaming.loader import load_label_space
from models import build_model
from trainer.backends import load_model_weights
from trainer.config import load_config
from trainer.distributed import shutdown_distributed
from trainer.evaluation.eval_sources import load_eval_manifests, map_eval_sources
from trainer.evaluation.evaluator import evaluate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None, help="a DDP checkpoint of configs/demo_cpu.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=1, help="eval data-loader workers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # The demo's own data: 160 train / 40 val images per source (the train split fixes the label space).
        overrides = demo_overrides(make_demo_shards(root), root / "run", evaluate=True)
        cfg = load_config(DEMO_CONFIG, overrides + [f"eval.num_workers={args.num_workers}"])

        single_process_group()
        label_space, _ = load_label_space(cfg.data, cfg.model.task_specs)
        model = build_model(cfg.model, num_classes=label_space.num_classes(), tasks=label_space.tasks)
        if args.checkpoint:
            load_model_weights(model, Path(args.checkpoint), backend="ddp")
        model.eval()

        eval_space, manifests = map_eval_sources(label_space, load_eval_manifests(cfg.eval), cfg.eval.sources)
        loader = build_eval_loader(
            manifests, label_space=eval_space, transforms=cfg.data.transforms,
            rank=0, world_size=1, batch_size=cfg.eval.batch_size, num_workers=0, max_images=cfg.eval.max_images,
        )
        batches = [batch.images for batch, _ in loader]
        images = sum(len(b) for b in batches)

        def bare_round() -> float:
            t0 = time.perf_counter()
            for b in batches:
                model.predict(b)
            return images / (time.perf_counter() - t0)

        def eval_round() -> float:
            metrics = evaluate(
                model, cfg.eval, transforms=cfg.data.transforms, label_space=label_space, rank=0, world_size=1,
                device=torch.device("cpu"), out_dir=root / "eval",
            )
            assert metrics["eval/images"] == images
            return metrics["eval/images_per_s"]

        bare_round()  # warm-up: allocator, first-call costs
        bare, full = [], []
        for _ in range(args.rounds):
            bare.append(bare_round())
            full.append(eval_round())
        shutdown_distributed()

    b, e = statistics.median(bare), statistics.median(full)
    print(f"images            : {images} (demo val split, {len(DEMO_TASKS)} sources), batch {cfg.eval.batch_size}, "
          f"{args.threads} threads, {args.num_workers} loader worker(s)")
    print(f"bare predict      : {b:8.2f} images/s (median of {args.rounds} rounds)")
    print(f"evaluate          : {e:8.2f} images/s -> {images / e:.1f} s per evaluation")
    print(f"ratio eval/bare   : {e / b:.3f}  (1.0 = evaluation costs no more than the forward)")


if __name__ == "__main__":
    main()
