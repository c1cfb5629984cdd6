"""Evaluation throughput on the demo validation split vs the model's bare forward.

``evaluate`` (decode + resize, ``predict``, mapping to COCO results, RLE encoding,
COCOeval, dense metrics, summary files) against ``model.predict`` alone on the same,
already decoded batches; one process. Rounds alternate between the two so that machine
noise hits both alike; medians and their ratio are printed.

    .venv/bin/python bench/eval_throughput.py [--checkpoint RUN/checkpoints/latest] [--rounds 3]

Without ``--checkpoint`` the model is untrained: it detects next to nothing, which makes
the mask/keypoint cascades and the COCO work unrealistically cheap. Pass the demo run's
checkpoint (trained with the same config) for representative numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.convert import convert_demo  # noqa: E402
from data_pipelines.label_space import build_label_space  # noqa: E402
from data_pipelines.loader import SourceConfig, load_manifests  # noqa: E402
from data_pipelines.synthetic import generate_demo_data  # noqa: E402
from models import build_model  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.distributed import init_distributed, shutdown_distributed  # noqa: E402
from trainer.evaluation.eval_main import load_model_weights  # noqa: E402
from trainer.evaluation.eval_sources import load_eval_manifests, map_eval_sources  # noqa: E402
from trainer.evaluation.eval_stream import build_eval_loader  # noqa: E402
from trainer.evaluation.evaluator import evaluate  # noqa: E402

SOURCES = ["shapes_instances", "shapes_keypoints", "shapes_semantic", "shapes_classes"]
REPO = Path(__file__).resolve().parents[1]


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
        convert_demo(generate_demo_data(root / "raw", seed=0), root / "shards")
        overrides = [f"data.sources.{i}.path={root / 'shards' / 'train' / s}" for i, s in enumerate(SOURCES)]
        overrides += [f"run.dir={root / 'run'}", f"eval.num_workers={args.num_workers}"]
        cfg = load_config(REPO / "configs" / "demo_cpu.yaml", overrides)
        cfg.eval.sources = [SourceConfig(path=str(root / "shards" / "val" / s)) for s in SOURCES]

        os.environ.pop("RANK", None)
        dist_info = init_distributed(device="cpu")
        label_space = build_label_space(load_manifests(cfg.data))
        model = build_model(cfg.model, num_classes=label_space.num_classes())
        if args.checkpoint:
            load_model_weights(model, Path(args.checkpoint))
        model.eval()

        manifests = load_eval_manifests(cfg.eval, model_tasks=list(model.heads))
        loader = build_eval_loader(
            manifests, label_space=map_eval_sources(label_space, manifests), transforms=cfg.data.transforms,
            rank=0, world_size=1, batch_size=cfg.eval.batch_size, num_workers=0, max_images=None,
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
    print(f"images            : {images} (demo val split, {len(SOURCES)} sources), batch {cfg.eval.batch_size}, "
          f"{args.threads} threads, {args.num_workers} loader worker(s)")
    print(f"bare predict      : {b:8.2f} images/s (median of {args.rounds} rounds)")
    print(f"evaluate          : {e:8.2f} images/s -> {images / e:.1f} s per evaluation")
    print(f"ratio eval/bare   : {e / b:.3f}  (1.0 = evaluation costs no more than the forward)")


if __name__ == "__main__":
    main()
