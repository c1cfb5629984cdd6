"""``polytask export``: a checkpoint's model as files other tools read, without polytask's
checkpoint formats.

Output in ``out_dir``::

    model.safetensors   the consolidated model weights (the state_dict of ``MultiTaskModel``),
                        nothing else: no optimizer, no pickled objects
    model.json          what rebuilds and reads the model: the model config, its tasks (name,
                        type, boxes_from), the output sizes and label spaces (names by output
                        index) per task, each keypoint task's schema with its OKS sigmas, the
                        input normalisation and size, and the checkpoint it came from

Rebuilding needs no process group (see README, "Exporting a model")::

    spec = json.loads(Path(out_dir, "model.json").read_text())
    model = build_model(ModelConfig(**spec["model"]), num_classes=spec["num_classes"])
    model.load_state_dict(safetensors.torch.load_file(Path(out_dir, "model.safetensors")))
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from data_pipelines.label_space import LabelSpace
from data_pipelines.streaming.config import TransformConfig
from data_pipelines.streaming.loader import load_label_space
from models import ModelConfig, MultiTaskModel, build_model
from trainer.backends import BACKENDS, load_model_weights
from trainer.checkpoint import Checkpointer, CheckpointLoadError
from trainer.checkpoint.compatibility import check_model_record
from trainer.config import JobConfig
from trainer.config_loading import ConfigError
from trainer.distributed import init_distributed, shutdown_distributed
from trainer.weights_digest import weights_digest

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
SPEC_NAME = "model.json"
FORMAT = "polytask-model"
FORMAT_VERSION = 2  # 2: tasks by name, label spaces and keypoint schemas per task


def checkpoint_model(cfg: JobConfig, checkpoint: str | Path) -> tuple[MultiTaskModel, LabelSpace, dict[str, Any]]:
    """The config's model on the CPU with ``checkpoint``'s weights (DDP or DeepSpeed ZeRO 0-3,
    any world size), in eval mode; its label space (from the training sources' manifests, as
    in training) and the checkpoint's meta. One process, no torchrun."""
    checkpoint = Path(checkpoint)
    meta = Checkpointer(run_dir=cfg.run.dir, cfg=cfg.checkpoint, is_main=False).read_meta(checkpoint)
    backend = meta.get("backend", "ddp")
    if backend not in BACKENDS:
        raise ConfigError(f"{checkpoint}: written by an unknown backend {backend!r}")
    label_space = load_label_space(cfg.data, cfg.model.task_specs)[0]
    try:
        check_model_record(checkpoint, meta, label_space=label_space, model_cfg=cfg.model)
    except CheckpointLoadError as e:  # one line, as the other checkpoint problems here
        raise ConfigError(str(e)) from None
    model = build_model(cfg.model, num_classes=label_space.num_classes(), tasks=label_space.tasks)
    # DCP reads collectively: a process group of one, as `polytask eval` uses alone, unless
    # the caller already runs in one.
    owned = not dist.is_initialized()
    if owned:
        init_distributed(device="cpu", timeout_s=cfg.trainer.dist_timeout_s)
    try:
        load_model_weights(model, checkpoint, backend=backend)
    finally:
        if owned:
            shutdown_distributed()
    return model.eval(), label_space, meta


def export_model(cfg: JobConfig, checkpoint: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``model.safetensors`` and ``model.json`` of ``checkpoint`` into ``out_dir``;
    returns their paths."""
    model, label_space, meta = checkpoint_model(cfg, checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    digest = weights_digest(state)
    weights = out / WEIGHTS_NAME
    save_file(state, weights, metadata={"format": FORMAT, "sha256": digest})
    # safetensors creates the file owner-only (0600); an export is for sharing: the umask decides.
    umask = os.umask(0)
    os.umask(umask)
    weights.chmod(0o666 & ~umask)
    spec = export_spec(cfg.model, label_space, transforms=cfg.data.transforms)
    spec["weights"] = {"file": WEIGHTS_NAME, "sha256": digest}
    spec["checkpoint"] = {"path": str(Path(checkpoint).resolve()), "step": meta.get("step"),
                          "backend": meta.get("backend", "ddp")}
    spec_path = out / SPEC_NAME
    spec_path.write_text(json.dumps(spec, indent=2))
    log.info("exported step %s of %s to %s (weights sha256 %s)", meta.get("step"), checkpoint, out, digest)
    return [weights, spec_path]


def export_spec(model_cfg: ModelConfig, label_space: LabelSpace, *, transforms: TransformConfig) -> dict:
    """The JSON-able description that rebuilds the model and names its outputs."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        # The tasks as the job resolved them (model.tasks, or the ones derived from the
        # sources), so that ModelConfig(**spec["model"]) rebuilds these heads.
        "model": asdict(model_cfg) | {"tasks": {t.name: {"type": t.type, "boxes_from": t.boxes_from}
                                                for t in label_space.tasks}},
        "num_classes": label_space.num_classes(),
        "tasks": [asdict(t) for t in label_space.tasks],
        # Output index -> name, per task (predict() returns outputs per task name).
        "label_space": label_space.outputs(),
        # Per keypoint task, its (unified) schema.
        "keypoints": {
            task: {
                "names": list(schema.names),
                "skeleton": [list(pair) for pair in schema.skeleton],  # 1-based pairs, as in COCO
                "flip_map": [list(pair) for pair in schema.flip_map],
                "sigmas": list(schema.sigmas),  # OKS sigmas, one per keypoint
            }
            for task, schema in label_space.keypoint_schemas.items()
        },
        # predict() takes float RGB in [0, 1], [B, 3, H, W]; it normalises itself (model.norm_*).
        # Resized as evaluation does: square = image_size x image_size; short_side = one
        # factor, shorter side image_size, longer side at most max_size.
        "input": {"resize": transforms.resize, "image_size": transforms.image_size, "max_size": transforms.max_size,
                  "value_range": [0.0, 1.0], "channels": "RGB"},
    }


def load_exported_model(directory: str | Path) -> tuple[MultiTaskModel, dict]:
    """An exported model, rebuilt and in eval mode, and its ``model.json``."""
    directory = Path(directory)
    spec = json.loads((directory / SPEC_NAME).read_text())
    if spec.get("format") != FORMAT:
        raise ValueError(f"{directory / SPEC_NAME}: not a polytask model export (format {spec.get('format')!r})")
    # An export from before model.fcos_box_activation existed was trained with ReLU.
    # spec["model"]["tasks"] holds the tasks (version 1: their types, each task named after its type).
    model = build_model(ModelConfig(**{"fcos_box_activation": "relu", **spec["model"]}), num_classes=spec["num_classes"])
    state: dict[str, torch.Tensor] = load_file(directory / spec["weights"]["file"])
    model.load_state_dict(state)
    return model.eval(), spec
