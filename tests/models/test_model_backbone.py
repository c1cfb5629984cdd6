"""Every registered backbone: P3-P7 contract, layer freezing, local weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from models.backbone import FPN_STRIDES, backbone_names, build_backbone, register_backbone
from models.config import ModelConfig


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("norm", ["frozen_bn", "group_norm"])
@pytest.mark.parametrize("name", backbone_names())
def test_backbone_gives_p3_to_p7(name: str, norm: str) -> None:
    backbone = build_backbone(ModelConfig(backbone=name, fpn_channels=64, backbone_norm=norm))
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 128, 96))
    assert list(out) == list(FPN_STRIDES) and backbone.out_channels == 64
    for level, stride in FPN_STRIDES.items():
        assert out[level].shape == (1, 64, -(-128 // stride), -(-96 // stride)), level


@pytest.mark.parametrize(
    "layers, trainable",
    [(0, set()), (2, {"layer3", "layer4"}), (5, {"conv1", "layer1", "layer2", "layer3", "layer4"})],
)
def test_trainable_backbone_layers(layers: int, trainable: set[str]) -> None:
    backbone = build_backbone(ModelConfig(trainable_backbone_layers=layers))
    stages = {n.split(".")[1] for n, p in backbone.named_parameters() if n.startswith("body.") and p.requires_grad}
    assert stages == trainable
    assert all(p.requires_grad for p in backbone.fpn.parameters())


def test_group_norm_keeps_samples_independent() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(backbone_norm="group_norm", fpn_channels=64)).train()
    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        alone = backbone(a)["p3"]
        together = backbone(torch.cat([a, b]))["p3"][:1]
    # No batch statistics: equal up to the rounding of convolutions run at another batch size
    # (seen: 1e-4 on values of 3, which atol=1e-5 alone failed once); batch norm differs by O(1).
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-4)


def test_loads_local_classification_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    backbone = build_backbone(ModelConfig(backbone_weights=str(tmp_path / "resnet18.pth")))
    torch.testing.assert_close(backbone.body.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    torch.testing.assert_close(backbone.body.bn1.running_var, state["bn1.running_var"])


def test_mismatching_weights_name_the_keys(tmp_path: Path) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer4.1.conv2.weight"]
    state["head.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"layer4\.1\.conv2\.weight.*head\.weight"):
        build_backbone(ModelConfig(backbone_weights=str(tmp_path / "bad.pth")))


@pytest.mark.parametrize(
    "other, complaint", [("resnet34", r"unexpected keys \['layer1\.2"), ("resnet50", "size mismatch")]
)
def test_weights_of_another_architecture_are_rejected(tmp_path: Path, other: str, complaint: str) -> None:
    torch.save(torchvision.models.get_model(other, weights=None).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=complaint):
        build_backbone(ModelConfig(backbone="resnet18", backbone_weights=str(tmp_path / "other.pth")))


def test_a_name_takes_one_backbone() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        register_backbone("resnet18")(lambda cfg: None)
