"""Backbones selectable by name, each a torchvision trunk with an FPN giving P3-P7.

Contract every registered backbone keeps: ``forward(images) -> OrderedDict`` with the keys
of :data:`FPN_STRIDES` in that order, each ``[B, out_channels, H / stride, W / stride]``
(rounded up), and an ``out_channels`` attribute.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from models.config import BACKBONES

if TYPE_CHECKING:
    from models.config import ModelConfig

# FPN level -> stride in input pixels; P3-P7 is the pyramid FCOS is defined on.
FPN_STRIDES: dict[str, int] = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}

BackboneBuilder = Callable[["ModelConfig"], nn.Module]
_BACKBONES: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Register ``builder(cfg) -> nn.Module`` under ``name``; a name can be taken once."""

    def decorator(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        if name not in BACKBONES:  # the config checks model.backbone against that list, torch-free
            raise ValueError(f"backbone {name!r}: add it to models.config.BACKBONES too")
        _BACKBONES[name] = builder
        return builder

    return decorator


def backbone_names() -> list[str]:
    return sorted(_BACKBONES)


def build_backbone(cfg: ModelConfig) -> nn.Module:
    if cfg.backbone not in _BACKBONES:
        raise ValueError(f"backbone: unknown {cfg.backbone!r}; registered: {backbone_names()}")
    return _BACKBONES[cfg.backbone](cfg)


def load_local_weights(module: nn.Module, path: str) -> None:
    """Load a local state_dict into ``module``, failing loudly on any key or shape mismatch."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches are raised even when strict=False
        raise ValueError(f"backbone_weights {path}: {e}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"backbone_weights {path}: does not match {type(module).__name__}; "
            f"missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}"
        )


# Both normalise each sample on its own (no batch statistics). frozen_bn is the recipe for
# pretrained weights; from scratch it is the identity, so group_norm trains better there.
_NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "frozen_bn": FrozenBatchNorm2d,
    "group_norm": lambda channels: nn.GroupNorm(32, channels),
}


def _resnet_fpn(name: str, cfg: ModelConfig) -> BackboneWithFPN:
    # Same recipe as torchvision's resnet_fpn_backbone (frozen BN, layer freezing, returned
    # layers 2-4 + P6/P7 as in fcos_resnet50_fpn), which hard-codes 256 FPN channels.
    # FrozenBatchNorm2d also keeps samples independent, so a sample without a task's label
    # cannot change that task's loss through batch statistics.
    trunk = torchvision.models.get_model(name, weights=None, norm_layer=_NORM_LAYERS[cfg.backbone_norm])
    if cfg.backbone_weights:
        load_local_weights(trunk, cfg.backbone_weights)
    trainable = ("layer4", "layer3", "layer2", "layer1", "conv1")[: cfg.trainable_backbone_layers]
    for param_name, param in trunk.named_parameters():
        if not param_name.startswith(trainable):
            param.requires_grad_(False)
    c5 = trunk.fc.in_features
    return BackboneWithFPN(
        trunk,
        return_layers={"layer2": "p3", "layer3": "p4", "layer4": "p5"},
        in_channels_list=[c5 // 4, c5 // 2, c5],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels),
    )


for _name in BACKBONES:  # every listed backbone is a torchvision ResNet
    register_backbone(_name)(functools.partial(_resnet_fpn, _name))
