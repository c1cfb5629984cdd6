"""ModelConfig validation: a bad value is a ValueError naming the field."""
from __future__ import annotations

import pytest

from data_pipelines.schema import TASKS
from models.config import ModelConfig


def test_defaults_cover_every_task() -> None:
    cfg = ModelConfig()
    assert cfg.tasks == list(TASKS) and cfg.backbone_weights is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("backbone", "vgg11"),
        ("tasks", ["detection", "depth"]),
        ("tasks", []),
        ("tasks", ["semantic", "semantic"]),
        ("tasks", ["instance_mask", "semantic"]),  # cascade head without detection
        ("trainable_backbone_layers", 6),
        ("fpn_channels", 100),
        ("fpn_channels", 32),
        ("semantic_channels", 0),
        ("norm_mean", (0.5, 0.5)),
        ("norm_std", (0.2, 0.0, 0.2)),
        ("size_divisible", 0),
        ("detection_score_thresh", 1.5),
        ("max_rois_per_image", 0),
        ("fcos_center_sampling_radius", 0.0),
    ],
)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_fields_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        ModelConfig("resnet18")  # type: ignore[misc]
