"""configs/gpu_r50_fpn.yaml stays a valid job config: it loads, its data set-up passes the
launcher's checks on real (demo) shards, and its model builds from a local weights file."""
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from models import build_model
from tests.conftest import demo_source_overrides
from trainer.config import load_config
from trainer.preflight import preflight_problems

CONFIG = "configs/gpu_r50_fpn.yaml"


def test_gpu_config_loads_passes_preflight_and_builds_with_local_weights(demo_sources, tmp_path):
    weights = tmp_path / "resnet50.pth"
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(reference, weights)
    cfg = load_config(CONFIG, [*demo_source_overrides(demo_sources), f"model.backbone_weights={weights}"])
    assert (cfg.model.backbone, cfg.model.backbone_norm, cfg.model.fpn_channels) == ("resnet50", "frozen_bn", 256)
    assert (cfg.trainer.precision, cfg.trainer.device, cfg.data.num_workers) == ("bf16", "cuda", "auto")
    transforms = cfg.data.transforms
    assert (transforms.resize, transforms.image_size, transforms.max_size) == ("short_side", 800, 1333)
    assert transforms.scale_range == (0.8, 1.0)  # shorter side 640..800, as Detectron2's multi-scale
    assert preflight_problems(cfg, world_size=8) == []
    from data_pipelines.streaming.loader import load_manifests
    from data_pipelines.label_space import build_label_space

    num_classes = build_label_space(load_manifests(cfg.data)).num_classes()
    model = build_model(cfg.model, num_classes=num_classes)
    trunk = model.backbone.body
    assert torch.equal(trunk.layer4[0].conv1.weight, reference["layer4.0.conv1.weight"])  # the file's weights
    assert isinstance(trunk.bn1, FrozenBatchNorm2d)
    assert not trunk.layer1[0].conv1.weight.requires_grad and trunk.layer2[0].conv1.weight.requires_grad
