"""torchrun worker: ranks evaluate the tiny sources (an odd number of images) with the
ground-truth model; writes what this rank predicted and the metrics it got back.

    eval_gather_worker.py SOURCES_ROOT OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipelines.label_space import build_label_space
from data_pipelines.streaming.config import SourceConfig
from data_pipelines.manifest import load_manifest
from data_pipelines.streaming.config import TransformConfig
from tests.trainer.evaluation.fakes import GroundTruthModel
from tests.trainer.evaluation.tiny_sources import IMAGE_SIZE, SOURCES
from trainer.evaluation.config import EvalConfig
from trainer.evaluation.evaluator import evaluate

root, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
manifests = [load_manifest(root / name) for name in SOURCES]
label_space = build_label_space(manifests)
transforms = TransformConfig(image_size=IMAGE_SIZE)
model = GroundTruthModel(manifests, label_space=label_space, transforms=transforms)
cfg = EvalConfig(sources=[SourceConfig(path=str(root / name)) for name in SOURCES], batch_size=2, num_workers=0)
metrics = evaluate(
    model, cfg, transforms=transforms, label_space=label_space, rank=rank, world_size=world_size,
    device=torch.device("cpu"), out_dir=out_dir,
)
# One file per rank: two ranks printing at once can interleave their lines.
(out_dir.parent / f"result_rank{rank}.json").write_text(json.dumps({"rank": rank, "served": model.served, "metrics": metrics}))
dist.destroy_process_group()
