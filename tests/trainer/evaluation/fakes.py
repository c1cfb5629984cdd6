"""A test double for the network: predicts the ground truth (optionally perturbed) in the
resized frame the real model sees, so every other step of evaluation runs for real."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipelines.streaming.collate import collate
from data_pipelines.label_space import LabelSpace
from data_pipelines.manifest import Manifest
from data_pipelines.schema import IGNORE_INDEX
from data_pipelines.streaming.transforms import build_eval_transforms
from data_pipelines.streaming.config import SourceConfig, TransformConfig
from trainer.evaluation.eval_sources import map_eval_sources
from data_pipelines.streaming.eval_loader import EvalStream


# The task type each output key belongs to (boxes, scores and labels: detection's);
# classification's are "class_logits/<task>" here.
OUTPUT_TYPES = {"boxes": "detection", "scores": "detection", "labels": "detection", "masks": "instance_mask",
                "keypoints": "keypoints", "semantic_logits": "semantic"}


def image_digest(image: Tensor) -> str:
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


class GroundTruthModel(nn.Module):
    """``predict(images)`` returns each image's transformed ground truth as model outputs.

    Images are recognised by their pixels; the table is built by reading the sources
    through the real eval stream. With ``noise`` > 0 the outputs are perturbed
    (box jitter, random scores, dropped and spurious detections), deterministically.
    """

    def __init__(
        self, manifests: list[Manifest], *, label_space: LabelSpace, transforms: TransformConfig, noise: float = 0.0
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({t: nn.Identity() for t in label_space.task_names})  # the tasks evaluation reads
        self.noise = noise
        self.space, manifests = map_eval_sources(label_space, manifests, [SourceConfig(path=m.root) for m in manifests])
        stream = EvalStream(
            manifests, label_space=self.space,
            transform=build_eval_transforms(transforms), rank=0, world_size=1, max_images=None,
        )
        self.table = {}
        for sample, _ in stream:
            self.table[image_digest(collate([sample]).images[0])] = sample
        self.served: list[str] = []  # sample keys, in the order they were predicted

    def predict(
        self, images: Tensor, *, tasks: Sequence[str] | None = None, image_sizes: Sequence[Sequence[int]] | None = None
    ) -> list[dict[str, dict[str, Tensor]]]:
        # Ground truth carries every labelled task; evaluation reads only the requested ones.
        if image_sizes is None:
            image_sizes = [images.shape[-2:]] * len(images)
        samples = [self.table[image_digest(image[:, :h, :w])] for image, (h, w) in zip(images, image_sizes)]
        self.served += [s["key"] for s in samples]
        # Dense outputs in the padded batch's frame, as a model that does not crop gives
        # them: evaluation must crop each to its own image.
        return [self._per_task(_padded(self._outputs(s), images.shape[-2:]), s["source"]) for s in samples]

    def _per_task(self, out: dict[str, Tensor], source: str) -> dict[str, dict[str, Tensor]]:
        """The flat outputs as ``MultiTaskModel.predict`` gives them: per task name, each
        key with the task of its type that the source feeds."""
        fed = self.space.source_tasks[source]
        nested: dict[str, dict[str, Tensor]] = {}
        for key, value in out.items():
            if key.startswith("class_logits/"):  # one per classification task
                nested[key.split("/", 1)[1]] = {"class_logits": value}
                continue
            task = fed.get(OUTPUT_TYPES[key]) or fed.get("detection") or next(
                (self.space.task(fed[t]).boxes_from for t in ("instance_mask", "keypoints") if t in fed), None)
            if task is not None:  # boxes of a source without instances: no task reads them
                nested.setdefault(task, {})[key] = value
        return nested

    def _classes(self, source: str, task_type: str) -> int:
        return len(self.space.classes[self.space.source_tasks[source][task_type]])

    def _class_outputs(self, sample: dict) -> dict[str, Tensor]:
        """"class_logits/<task>": a one-hot of the sample's label, per classification task."""
        return {f"class_logits/{key.split('/', 1)[1]}": F.one_hot(value, len(self.space.classes[key.split('/', 1)[1]])).float()
                for key, value in sample.items() if key.startswith("class_label/")}

    def _outputs(self, sample: dict) -> dict[str, Tensor]:
        height, width = sample["image"].shape[-2:]
        keep = ~sample["iscrowd"]
        boxes = sample["boxes"].as_subclass(Tensor)[keep]
        labels = sample["labels"][keep].clamp(min=0)  # keypoint-only sources have no class: -1
        out = {"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": labels}
        if "masks" in sample:
            out["masks"] = sample["masks"].as_subclass(Tensor)[keep][:, None].float()
        if "keypoints" in sample:
            points = sample["keypoints"].as_subclass(Tensor)[keep]
            visibility = sample["keypoint_visibility"][keep]
            out["keypoints"] = torch.cat([points, visibility[..., None].float()], dim=-1)
        if "semantic" in sample:
            semantic = sample["semantic"].as_subclass(Tensor)
            semantic = torch.where(semantic == IGNORE_INDEX, 0, semantic)
            out["semantic_logits"] = F.one_hot(semantic, self._classes(sample["source"], "semantic")).permute(2, 0, 1).float()
        out.update(self._class_outputs(sample))
        if self.noise:
            things = self._classes(sample["source"], "detection") if "detection" in self.space.source_tasks[
                sample["source"]] else 1
            out = self._perturb(out, seed=int(sample["image"].sum()), height=height, width=width, things=things)
        return out

    def _perturb(self, out: dict[str, Tensor], *, seed: int, height: int, width: int, things: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(seed)
        n = len(out["boxes"])
        kept = torch.rand(n, generator=g) > 0.2  # miss some objects
        jitter = torch.randn(n, 4, generator=g) * self.noise * 10
        out["boxes"] = (out["boxes"] + jitter).clamp(min=0)
        out["scores"] = torch.rand(n, generator=g)
        if "keypoints" in out:
            out["keypoints"][..., :2] += torch.randn(out["keypoints"][..., :2].shape, generator=g) * self.noise * 6
        if "masks" in out:
            out["masks"] = out["masks"] * (0.4 + torch.rand(out["masks"].shape, generator=g))
        for key in ("boxes", "scores", "labels", "masks", "keypoints"):
            if key in out:
                out[key] = out[key][kept]
        # Spurious detections, some of a class another source owns.
        m = 3
        x0y0 = torch.rand(m, 2, generator=g) * torch.tensor([width / 2, height / 2])
        spurious = {
            "boxes": torch.cat([x0y0, x0y0 + 20], dim=1),
            "scores": torch.rand(m, generator=g) * 0.5,
            "labels": torch.randint(0, things, (m,), generator=g),
        }
        if "masks" in out:
            spurious["masks"] = torch.rand(m, 1, height, width, generator=g)
        if "keypoints" in out:
            k = out["keypoints"].shape[1]
            spurious["keypoints"] = torch.cat([torch.rand(m, k, 2, generator=g) * 40, torch.ones(m, k, 1)], dim=-1)
        for key, value in spurious.items():
            out[key] = torch.cat([out[key], value])
        return out


def _padded(out: dict[str, Tensor], size: Sequence[int]) -> dict[str, Tensor]:
    """Dense outputs zero-padded bottom/right to ``size``; the rest as they are."""
    height, width = size
    for key in ("masks", "semantic_logits"):
        if key in out:
            value = out[key]
            out[key] = F.pad(value, (0, width - value.shape[-1], 0, height - value.shape[-2]))
    return out
