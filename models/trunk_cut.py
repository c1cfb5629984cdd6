"""Named segments of the shared trunk, for per-task gradient statistics.

Gradient methods compare the tasks' gradients of some shared parameters: those of a *cut*
in the trunk (backbone + FPN) upwards. From the top down:

- ``features``: no parameters; the statistics are the gradients w.r.t. the shared features z.
- ``fpn``: the FPN (and its P6/P7 block).
- ``layer4``, ``layer3``: that ResNet stage, the stages above it and the FPN.
- ``parameters``: every trainable trunk parameter.

Naming a ResNet stage needs the torchvision ``BackboneWithFPN`` layout every registered
backbone has today (``body``: an ``IntermediateLayerGetter``; ``fpn``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free: the config (balancer.statistics) checks CUTS
    from torch import nn

CUTS: tuple[str, ...] = ("features", "fpn", "layer4", "layer3", "parameters")


def segment_parameters(backbone: nn.Module, cut: str) -> list[nn.Parameter]:
    """The trainable trunk parameters from ``cut`` up to the shared features, in module order."""
    if cut not in CUTS:
        raise ValueError(f"unknown trunk cut {cut!r}; expected one of {list(CUTS)}")
    if cut == "features":
        return []
    if cut == "parameters":
        return [p for p in backbone.parameters() if p.requires_grad]
    if not (hasattr(backbone, "body") and hasattr(backbone, "fpn")):
        raise ValueError(f"trunk cut {cut!r} needs a backbone with .body and .fpn (torchvision BackboneWithFPN); "
                         f"{type(backbone).__name__} has not")
    modules: list[nn.Module] = []
    if cut != "fpn":
        names = list(backbone.body)
        if cut not in names:
            raise ValueError(f"trunk cut {cut!r}: the backbone has no stage {cut!r} (has {names})")
        modules += [backbone.body[n] for n in names[names.index(cut):]]
    modules.append(backbone.fpn)
    return [p for m in modules for p in m.parameters() if p.requires_grad]
