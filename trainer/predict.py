"""``polytask predict``: a checkpoint's model on image files, drawn and written out.

Output in ``out_dir``::

    <image stem>.png     the image with every task's output drawn (torchvision's drawing
                         utilities): boxes with class and score, instance masks, keypoints with
                         the skeleton, the semantic overlay; beside it, the semantic legend
                         and the image class's top-5
    predictions.jsonl    one line per image: ``file``, ``height``, ``width`` and, per task name
                         (model.tasks), in original pixels (COCO style): a detection task's
                         ``detections`` (``bbox`` [x, y, w, h], ``score``, ``category``,
                         ``category_index``); an instance_mask task's ``segmentations`` and a
                         keypoint task's ``keypoints`` [x1, y1, v1, ...], one per detection of
                         the task named by ``boxes_from``, in its order; a semantic task's
                         ``semantic`` (an RLE per class present); a classification task's ``top5``

Images are decoded and resized exactly as evaluation does (reduced JPEG decode, the eval
resize), one at a time, so the numbers are those evaluation scores. Runs on the CPU.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from data_pipelines.label_space import LabelSpace
from data_pipelines.streaming.collate import images_to_float
from data_pipelines.streaming.decode import _decode_image  # the decode evaluation uses
from data_pipelines.streaming.loader import load_manifests
from data_pipelines.streaming.transforms import build_eval_transforms
from data_pipelines.tasks import TaskSpec
from models import MultiTaskModel
from trainer.config import JobConfig
from trainer.evaluation.predictions import encode_masks
from trainer.export import checkpoint_model

log = logging.getLogger(__name__)

PREDICTIONS_NAME = "predictions.jsonl"
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
TOP_K = 5
MASK_ALPHA = 0.45
SEMANTIC_ALPHA = 0.35
DPI = 100
DRAW_SIZE = 512  # pixels: images smaller than this are enlarged for drawing


@dataclass(frozen=True)
class Names:
    """What the model's output indices mean, per task, and what to draw with them."""

    tasks: list[TaskSpec]
    classes: dict[str, list[str]]  # task -> output names by index
    # keypoint task -> the indices of its boxes_from task's classes that carry keypoints (empty: all)
    keypoint_things: dict[str, set[int]]
    skeletons: dict[str, list[tuple[int, int]]]  # keypoint task -> 0-based pairs

    @staticmethod
    def of(label_space: LabelSpace, keypoint_classes: dict[str, set[str]]) -> "Names":
        """``keypoint_classes``: per keypoint task, the classes of the sources feeding it."""
        keypoint_tasks = [t for t in label_space.tasks if t.type == "keypoints"]
        return Names(
            tasks=list(label_space.tasks),
            classes=label_space.outputs(),
            keypoint_things={t.name: {i for i, n in enumerate(label_space.classes[t.boxes_from])
                                      if n in keypoint_classes.get(t.name, set())} for t in keypoint_tasks},
            skeletons={t.name: [(a - 1, b - 1) for a, b in label_space.keypoint_schemas[t.name].skeleton]
                       for t in keypoint_tasks},
        )

    def of_type(self, task_type: str) -> list[TaskSpec]:
        return [t for t in self.tasks if t.type == task_type]

    def cascades_of(self, detection: str) -> list[TaskSpec]:
        return [t for t in self.tasks if t.boxes_from == detection]


def image_files(inputs: list[str | Path]) -> list[Path]:
    """Image files named, and those in directories named (recursively, sorted); an input that
    is missing, or no image at all, is an error naming it."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{item}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this directory")
            files += found
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_SUFFIXES:
                raise ValueError(f"{item}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    return files


def predict_images(cfg: JobConfig, checkpoint: str | Path, inputs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Predict every image of ``inputs`` with ``checkpoint``'s model; returns the PNGs written
    and, last, ``predictions.jsonl``."""
    files = image_files(inputs)  # before the model loads: a typo fails at once
    model, label_space, meta = checkpoint_model(cfg, checkpoint)
    keypoint_classes: dict[str, set[str]] = {}
    for m in load_manifests(cfg.data):
        task = label_space.task_of(m.name, "keypoints")
        if task is not None:
            keypoint_classes.setdefault(task, set()).update(c["name"] for c in m.categories)
    names = Names.of(label_space, keypoint_classes)
    transform = build_eval_transforms(cfg.data.transforms)
    decode_size = cfg.data.transforms.decode_size()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, lines, stems = [], [], set()
    for path in files:
        prediction, original = predict_file(model, path, transform=transform, decode_size=decode_size)
        height, width = original.shape[-2:]
        record = {"file": str(path), "height": height, "width": width,
                  **prediction_record(prediction, names, height=height, width=width)}
        lines.append(json.dumps(record))
        png = out / f"{_unique(path.stem, stems)}.png"
        draw_prediction(original, prediction, names, title=str(path)).savefig(png, dpi=DPI)
        written.append(png)
    predictions = out / PREDICTIONS_NAME
    predictions.write_text("".join(line + "\n" for line in lines))
    log.info("predicted %d image(s) with step %s of %s into %s", len(files), meta.get("step"), checkpoint, out)
    return [*written, predictions]


def predict_file(
    model: MultiTaskModel, path: Path, *, transform, decode_size: int | None
) -> tuple[dict[str, dict[str, Tensor]], Tensor]:
    """One image's outputs per task name, mapped to its original pixels (``boxes``,
    ``scores``, ``labels``; ``masks`` bool [N, H, W]; ``keypoints`` [N, K, 3]; ``semantic``
    [H, W]; ``class_scores``), and the original uint8 image for drawing."""
    data = path.read_bytes()
    try:
        image, frame = _decode_image({IMAGE_SUFFIXES[path.suffix.lower()]: data}, decode_size)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    height, width = frame.height, frame.width
    resized = transform({"image": image})["image"].as_subclass(Tensor)
    with torch.no_grad():
        outputs = model.predict(images_to_float(resized[None]))[0]
    input_h, input_w = resized.shape[-2:]
    scale_x, scale_y = width / input_w, height / input_h
    results: dict[str, dict[str, Tensor]] = {}
    for task, output in outputs.items():
        result: dict[str, Tensor] = {}
        if "boxes" in output:
            result["boxes"] = output["boxes"].float() * torch.tensor([scale_x, scale_y, scale_x, scale_y])
            result["scores"], result["labels"] = output["scores"], output["labels"]
        if "masks" in output:
            probs = F.interpolate(output["masks"].float(), size=(height, width), mode="bilinear", align_corners=False)
            result["mask_probs"] = output["masks"]  # for the RLEs, encoded exactly as evaluation does
            result["masks"] = probs[:, 0] > 0.5
        if "keypoints" in output:
            result["keypoints"] = output["keypoints"].float() * torch.tensor([scale_x, scale_y, 1.0])
        if "semantic_logits" in output:
            logits = F.interpolate(output["semantic_logits"][None].float(), size=(height, width), mode="bilinear",
                                   align_corners=False)
            result["semantic"] = logits[0].argmax(dim=0)
        if "class_logits" in output:
            result["class_scores"] = output["class_logits"].float().softmax(dim=0)
        results[task] = result
    original = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return results, original


def prediction_record(prediction: dict[str, dict[str, Tensor]], names: Names, *, height: int, width: int) -> dict:
    """The JSON-able predictions of one image, per task name (see the module docstring)."""
    record: dict = {}
    for task in names.tasks:
        out = prediction.get(task.name)
        if out is None:
            continue
        classes = names.classes[task.name]
        if task.type == "detection":
            record[task.name] = {"detections": [
                {"bbox": [x0, y0, x1 - x0, y1 - y0], "score": score, "category": classes[label], "category_index": label}
                for (x0, y0, x1, y1), score, label in zip(out["boxes"].tolist(), out["scores"].tolist(),
                                                          out["labels"].tolist())
            ]}
        elif task.type == "instance_mask":
            rles = encode_masks(out["mask_probs"], height, width) if len(out["mask_probs"]) else []
            record[task.name] = {"boxes_from": task.boxes_from, "segmentations": rles}
        elif task.type == "keypoints":
            record[task.name] = {"boxes_from": task.boxes_from,
                                 "keypoints": [k.flatten().tolist() for k in out["keypoints"]]}
        elif task.type == "semantic":
            semantic = out["semantic"]
            record[task.name] = {"semantic": [
                {"category": classes[c], "category_index": c, "segmentation": _rle(semantic == c),
                 "area_fraction": float((semantic == c).float().mean())}
                for c in semantic.unique().tolist()
            ]}
        else:
            scores, order = out["class_scores"].sort(descending=True, stable=True)
            record[task.name] = {"top5": [{"class": classes[c], "score": s}
                                          for c, s in zip(order[:TOP_K].tolist(), scores[:TOP_K].tolist())]}
    return record


def draw_prediction(image: Tensor, prediction: dict[str, dict[str, Tensor]], names: Names, *, title: str) -> Figure:
    """The image with every task's outputs drawn on it, and a side panel with the semantic
    legends and each classification task's top-5."""
    # Small images are enlarged (nearest, whole factor) before drawing, so that captions and
    # lines are drawn at the PNG's resolution rather than blown up with the pixels.
    factor = max(1, math.ceil(DRAW_SIZE / max(image.shape[-2:])))
    prediction = {task: _enlarged(out, factor) for task, out in prediction.items()}
    drawn = F.interpolate(image[None], scale_factor=factor, mode="nearest")[0] if factor > 1 else image
    side = max(drawn.shape[-2:])
    semantic_tasks = [t.name for t in names.of_type("semantic") if t.name in prediction]
    for task in semantic_tasks:
        semantic = prediction[task]["semantic"]
        classes = semantic.unique().tolist()
        drawn = draw_segmentation_masks(drawn, torch.stack([semantic == c for c in classes]), alpha=SEMANTIC_ALPHA,
                                        colors=[_colour(c, "semantic") for c in classes])
    detections = 0
    for task in names.of_type("detection"):
        out = prediction.get(task.name)
        if out is None or not len(out["boxes"]):
            continue
        detections += len(out["boxes"])
        labels = out["labels"].tolist()
        colours = [_colour(label, "thing") for label in labels]
        cascades = [c for c in names.cascades_of(task.name) if c.name in prediction]
        for cascade in cascades:
            if cascade.type == "instance_mask":
                drawn = draw_segmentation_masks(drawn, prediction[cascade.name]["masks"], alpha=MASK_ALPHA,
                                                colors=colours)
        things = names.classes[task.name]
        captions = [f"{things[label]} {score:.2f}" for label, score in zip(labels, out["scores"].tolist())]
        drawn = draw_bounding_boxes(drawn, out["boxes"], labels=captions, colors=colours,
                                    width=max(1, side // 200), font=_font(), font_size=max(12, side // 40))
        for cascade in cascades:
            if cascade.type != "keypoints":
                continue
            # The keypoint head runs on every box; only the classes that have keypoints get them drawn.
            carry = names.keypoint_things[cascade.name]
            keep = [i for i, label in enumerate(labels) if not carry or label in carry]
            if keep:
                drawn = draw_keypoints(drawn, prediction[cascade.name]["keypoints"][keep, :, :2],
                                       connectivity=names.skeletons[cascade.name], colors="#ffff00",
                                       radius=max(1, side // 100), width=max(1, side // 200))
    fig = Figure(figsize=(9.0, 5.5), dpi=DPI, layout="constrained")
    image_ax, text_ax = fig.subplots(1, 2, width_ratios=(3, 1))
    image_ax.imshow(drawn.permute(1, 2, 0).numpy())
    image_ax.set_title(title, fontsize="small")
    image_ax.axis("off")
    text_ax.axis("off")
    for task in semantic_tasks:
        handles = [Patch(color=_colour(c, "semantic"), label=names.classes[task][c])
                   for c in prediction[task]["semantic"].unique().tolist()]
        text_ax.add_artist(text_ax.legend(handles=handles, title=task, loc="upper left", fontsize="small",
                                          frameon=False))
    lines = []
    for task in names.of_type("classification"):
        if task.name in prediction:
            scores, order = prediction[task.name]["class_scores"].sort(descending=True, stable=True)
            lines += [f"{task.name} (top-5)"] + [f"{names.classes[task.name][c]}  {s:.2f}" for c, s in
                                                 zip(order[:TOP_K].tolist(), scores[:TOP_K].tolist())] + [""]
    if lines:
        text_ax.text(0.0, 0.35, "\n".join(lines), va="top", ha="left", fontsize="small",
                     family="monospace", transform=text_ax.transAxes)
    if names.of_type("detection"):
        text_ax.text(0.0, 0.02, f"{detections} detection(s)", fontsize="small", transform=text_ax.transAxes)
    return fig


def _enlarged(prediction: dict[str, Tensor], factor: int) -> dict[str, Tensor]:
    """The drawn outputs in an image enlarged ``factor`` times (nearest)."""
    if factor == 1:
        return prediction
    out = dict(prediction)
    if "boxes" in out:
        out["boxes"] = out["boxes"] * factor
    if "keypoints" in out:
        out["keypoints"] = out["keypoints"] * torch.tensor([factor, factor, 1.0])
    for key in ("masks", "semantic"):
        if key in out:
            value = out[key]
            planes = value[None, None] if key == "semantic" else value[:, None]  # [N, 1, H, W]
            grown = F.interpolate(planes.to(torch.uint8), scale_factor=factor, mode="nearest")[:, 0]
            out[key] = grown[0].long() if key == "semantic" else grown.bool()
    return out


def _font() -> str:
    """A TrueType font file (matplotlib ships DejaVu Sans): PIL's default bitmap font, which
    torchvision falls back on, ignores the font size."""
    from matplotlib import font_manager

    return font_manager.findfont("DejaVu Sans")


def _colour(index: int, kind: str) -> str:
    """A fixed colour per class (tab10/tab20), so a class looks the same in every image."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if kind == "thing" else "tab20"]
    r, g, b, _ = cmap(index % cmap.N)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _rle(mask: Tensor) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.to(torch.uint8).numpy()))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _unique(stem: str, used: set[str]) -> str:
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name
