"""What the multi-task model is built from: backbone, shared FPN width, tasks and head knobs.

Torch-free, like every config module (trainer/config.py says why)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from data_pipelines.tasks import TaskSpec, parse_tasks

# The registered backbones (models/backbone.py builds one per name): torchvision ResNets
# with an FPN over layers 2-4.
BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")


@dataclass(kw_only=True)
class ModelConfig:
    backbone: str = "resnet18"
    # Local state_dict of the backbone's classification network (e.g. torchvision's
    # resnet18-f37072fd.pth); weights are never downloaded.
    backbone_weights: str | None = None
    # Normalisation inside the backbone: frozen_bn (pretrained weights) or group_norm (from scratch).
    backbone_norm: Literal["frozen_bn", "group_norm"] = "frozen_bn"
    trainable_backbone_layers: int = 5  # 0..5, counted from the last stage, as in torchvision
    fpn_channels: int = 128
    # The tasks the model learns (data_pipelines/tasks.py): a list of types, each task named
    # after its type, or a mapping of task names to types ({type, boxes_from} for cascades).
    # None: one task per annotation type of the training sources, named after it.
    tasks: list[str] | dict[str, Any] | None = None
    norm_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    norm_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    # Images are zero-padded (bottom/right) to a multiple of this before the backbone.
    size_divisible: int = 32
    # Parameters and images in channels-last (NHWC) memory: faster convolutions on tensor
    # cores (bf16 on recent GPUs); on CPU usually slower. bench/gpu_check.sh measures it.
    channels_last: bool = False

    # Classes a sample's source does not annotate (data_pipelines/label_space.py coverage):
    # "ignore" gives their logits no loss on its samples (softmax tasks: restricted to the
    # source's classes); "negative" trains them as background/negatives, the naive merge,
    # kept to measure the difference (bench/partial_classes.py).
    unannotated_classes: Literal["ignore", "negative"] = "ignore"

    # detection (FCOS)
    fcos_num_convs: int = 4
    fcos_center_sampling_radius: float = 1.5
    # What makes the box regression a distance (>= 0). torchvision's "relu" can die: trained
    # from scratch (demo, seed 0), every output went negative by step 35 and stayed there
    # (zero-size boxes, whose GIoU gradient is 0 too: box AP 0 for good). "softplus" keeps a
    # gradient everywhere. Checkpoints from before this setting were trained with "relu".
    fcos_box_activation: Literal["softplus", "relu"] = "softplus"
    detection_score_thresh: float = 0.2
    detection_nms_thresh: float = 0.6
    detections_per_image: int = 100
    detection_topk_candidates: int = 1000

    # cascade heads (instance_mask, keypoints): ground-truth RoIs per image at training time
    max_rois_per_image: int = 16
    mask_roi_size: int = 14
    mask_head_convs: int = 4
    keypoint_roi_size: int = 14
    keypoint_head_convs: int = 4

    # semantic
    semantic_channels: int = 128

    # classification: 3x3 conv + GroupNorm + ReLU layers shared by the FPN levels before
    # pooling, as FCOS's classification tower (0: pool the FPN levels directly)
    classification_head_convs: int = 2

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: unknown {self.backbone!r}; registered: {list(BACKBONES)}")
        if self.tasks is not None:
            parse_tasks(self.tasks, where="tasks")
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise ValueError(f"trainable_backbone_layers: expected 0..5, got {self.trainable_backbone_layers}")
        for name in ("fpn_channels", "semantic_channels"):
            value = getattr(self, name)
            # GroupNorm(32) in the FCOS and semantic heads; on a 1x1 P7 map each group needs 2+ channels.
            if value < 64 or value % 32:
                raise ValueError(f"{name}: expected a multiple of 32 and at least 64, got {value}")
        for name in ("norm_mean", "norm_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name}: expected 3 values (RGB), got {getattr(self, name)}")
        if min(self.norm_std) <= 0:
            raise ValueError(f"norm_std: expected positive values, got {self.norm_std}")
        for name in ("detection_score_thresh", "detection_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1], got {getattr(self, name)}")
        for name in (
            "size_divisible", "fcos_num_convs", "detections_per_image", "detection_topk_candidates",
            "max_rois_per_image", "mask_roi_size", "mask_head_convs", "keypoint_roi_size", "keypoint_head_convs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.classification_head_convs < 0:
            raise ValueError(f"classification_head_convs: expected 0 or more, got {self.classification_head_convs}")
        if self.fcos_center_sampling_radius <= 0:
            raise ValueError(f"fcos_center_sampling_radius: expected > 0, got {self.fcos_center_sampling_radius}")

    @property
    def task_specs(self) -> list[TaskSpec] | None:
        """The configured tasks in config order, None when they are derived from the
        training sources (``LabelSpace.tasks`` then holds them)."""
        return None if self.tasks is None else parse_tasks(self.tasks, where="tasks")
