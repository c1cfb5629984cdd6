"""``polytask predict``: a checkpoint's model on image files, drawn and written out.

Output in ``out_dir``::

    <image stem>.png     the image with every task's output drawn (torchvision's drawing
                         utilities): boxes with class and score, instance masks, keypoints with
                         the skeleton, the semantic overlay; beside it, the semantic legend
                         and the image class's top-5
    predictions.jsonl    one line per image, in original pixels (COCO style): ``detections``
                         (``bbox`` [x, y, w, h], ``score``, ``category``, ``category_index``,
                         ``segmentation`` as compressed RLE, ``keypoints`` [x1, y1, v1, ...]),
                         ``semantic`` (an RLE per class present), ``classification`` (top-5)

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
    """What the model's output indices mean, and what to draw with them."""

    things: list[str]
    semantic: list[str]
    image_classes: list[str]
    keypoint_things: set[int]  # thing indices that carry keypoints (empty: all of them)
    skeleton: list[tuple[int, int]]  # 0-based pairs

    @staticmethod
    def of(label_space: LabelSpace, keypoint_classes: set[str]) -> "Names":
        schema = label_space.keypoints
        return Names(
            things=list(label_space.thing_classes),
            semantic=list(label_space.semantic_classes),
            image_classes=list(label_space.image_classes),
            keypoint_things={i for i, n in enumerate(label_space.thing_classes) if n in keypoint_classes},
            skeleton=[(a - 1, b - 1) for a, b in schema.skeleton] if schema else [],
        )


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
    keypoint_classes = {c["name"] for m in load_manifests(cfg.data) if "keypoints" in m.tasks for c in m.categories}
    names = Names.of(label_space, keypoint_classes)
    transform = build_eval_transforms(cfg.data.transforms)
    decode_size = cfg.data.transforms.decode_size()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, lines, stems = [], [], set()
    for path in files:
        prediction, original = predict_file(model, path, transform=transform, decode_size=decode_size)
        record = {"file": str(path), "height": original.shape[-2], "width": original.shape[-1],
                  **prediction_record(prediction, names)}
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
) -> tuple[dict[str, Tensor], Tensor]:
    """One image's outputs mapped to its original pixels (``boxes``, ``scores``, ``labels``,
    ``masks`` bool [N, H, W], ``keypoints`` [N, K, 3], ``semantic`` [H, W], ``class_scores``),
    and the original uint8 image for drawing."""
    data = path.read_bytes()
    try:
        image, frame = _decode_image({IMAGE_SUFFIXES[path.suffix.lower()]: data}, decode_size)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    height, width = frame.height, frame.width
    resized = transform({"image": image})["image"].as_subclass(Tensor)
    with torch.no_grad():
        output = model.predict(images_to_float(resized[None]))[0]
    input_h, input_w = resized.shape[-2:]
    scale_x, scale_y = width / input_w, height / input_h
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
    original = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return result, original


def prediction_record(prediction: dict[str, Tensor], names: Names) -> dict:
    """The JSON-able predictions of one image (see the module docstring)."""
    record: dict = {}
    if "boxes" in prediction:
        height, width = (prediction["masks"].shape[-2:] if "masks" in prediction else (None, None))
        rles = (encode_masks(prediction["mask_probs"], height, width)
                if "mask_probs" in prediction and len(prediction["boxes"]) else [])
        detections = []
        for i, ((x0, y0, x1, y1), score, label) in enumerate(
            zip(prediction["boxes"].tolist(), prediction["scores"].tolist(), prediction["labels"].tolist())
        ):
            detection = {"bbox": [x0, y0, x1 - x0, y1 - y0], "score": score, "category": names.things[label],
                         "category_index": label}
            if rles:
                detection["segmentation"] = rles[i]
            if "keypoints" in prediction:
                detection["keypoints"] = prediction["keypoints"][i].flatten().tolist()
            detections.append(detection)
        record["detections"] = detections
    if "semantic" in prediction:
        semantic = prediction["semantic"]
        record["semantic"] = [
            {"category": names.semantic[c], "category_index": c, "segmentation": _rle(semantic == c),
             "area_fraction": float((semantic == c).float().mean())}
            for c in semantic.unique().tolist()
        ]
    if "class_scores" in prediction:
        scores, order = prediction["class_scores"].sort(descending=True, stable=True)
        record["classification"] = {"top5": [{"class": names.image_classes[c], "score": s}
                                             for c, s in zip(order[:TOP_K].tolist(), scores[:TOP_K].tolist())]}
    return record


def draw_prediction(image: Tensor, prediction: dict[str, Tensor], names: Names, *, title: str) -> Figure:
    """The image with the outputs drawn on it, and a side panel with the semantic legend and
    the top-5 classes."""
    # Small images are enlarged (nearest, whole factor) before drawing, so that captions and
    # lines are drawn at the PNG's resolution rather than blown up with the pixels.
    factor = max(1, math.ceil(DRAW_SIZE / max(image.shape[-2:])))
    prediction = _enlarged(prediction, factor)
    drawn = F.interpolate(image[None], scale_factor=factor, mode="nearest")[0] if factor > 1 else image
    side = max(drawn.shape[-2:])
    if "semantic" in prediction:
        classes = prediction["semantic"].unique().tolist()
        masks = torch.stack([prediction["semantic"] == c for c in classes])
        drawn = draw_segmentation_masks(drawn, masks, alpha=SEMANTIC_ALPHA, colors=[_colour(c, "semantic") for c in classes])
    if "boxes" in prediction and len(prediction["boxes"]):
        labels = prediction["labels"].tolist()
        colours = [_colour(label, "thing") for label in labels]
        if "masks" in prediction:
            drawn = draw_segmentation_masks(drawn, prediction["masks"], alpha=MASK_ALPHA, colors=colours)
        captions = [f"{names.things[label]} {score:.2f}" for label, score in zip(labels, prediction["scores"].tolist())]
        drawn = draw_bounding_boxes(drawn, prediction["boxes"], labels=captions, colors=colours,
                                    width=max(1, side // 200), font=_font(), font_size=max(12, side // 40))
        if "keypoints" in prediction:
            # The keypoint head runs on every box; only the classes that have keypoints get them drawn.
            keep = [i for i, label in enumerate(labels) if not names.keypoint_things or label in names.keypoint_things]
            if keep:
                drawn = draw_keypoints(drawn, prediction["keypoints"][keep, :, :2], connectivity=names.skeleton,
                                       colors="#ffff00", radius=max(1, side // 100), width=max(1, side // 200))
    fig = Figure(figsize=(9.0, 5.5), dpi=DPI, layout="constrained")
    image_ax, text_ax = fig.subplots(1, 2, width_ratios=(3, 1))
    image_ax.imshow(drawn.permute(1, 2, 0).numpy())
    image_ax.set_title(title, fontsize="small")
    image_ax.axis("off")
    text_ax.axis("off")
    if "semantic" in prediction:
        handles = [Patch(color=_colour(c, "semantic"), label=names.semantic[c]) for c in prediction["semantic"].unique().tolist()]
        text_ax.legend(handles=handles, title="semantic", loc="upper left", fontsize="small", frameon=False)
    if "class_scores" in prediction:
        scores, order = prediction["class_scores"].sort(descending=True, stable=True)
        lines = [f"{names.image_classes[c]}  {s:.2f}" for c, s in zip(order[:TOP_K].tolist(), scores[:TOP_K].tolist())]
        text_ax.text(0.0, 0.35, "class (top-5)\n" + "\n".join(lines), va="top", ha="left", fontsize="small",
                     family="monospace", transform=text_ax.transAxes)
    if "boxes" in prediction:
        text_ax.text(0.0, 0.02, f"{len(prediction['boxes'])} detection(s)", fontsize="small", transform=text_ax.transAxes)
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
