"""Model outputs (resized frame, label-space indices) -> standard COCO results dicts
(original pixels, the source's own category and image ids)."""
from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from torch import Tensor

from data_pipelines.streaming.eval_loader import ImageRecord
from trainer.evaluation.source_spec import SourceSpec

# torchvision's reference evaluation binarises mask probabilities at this value.
MASK_THRESHOLD = 0.5


def coco_results(
    output: dict[str, Tensor], record: ImageRecord, spec: SourceSpec, *, input_size: tuple[int, int]
) -> dict[str, list[dict]]:
    """One image's results per iou type of ``spec``.

    Args:
        output: one image's ``MultiTaskModel.predict`` dict: ``boxes`` XYXY, ``scores``,
            ``labels`` (label-space index), ``masks`` [N, 1, h, w] probabilities,
            ``keypoints`` [N, K, 3], all in the (h, w) = ``input_size`` frame: the image as
            resized, without the padding of its batch (dense outputs may still hold it).
        record: the image's ids and original size.
        spec: the source's mappings.
        input_size: the image's resized (height, width), before padding; its own
            (``Batch.image_sizes``), not the batch's, whose images may differ in size.
    """
    results: dict[str, list[dict]] = {t: [] for t in spec.iou_types}
    if not results:
        return results
    output = valid_region(output, input_size)
    scale_x, scale_y = record.width / input_size[1], record.height / input_size[0]
    categories = _categories(output["labels"].tolist(), spec)
    base = [{"image_id": record.image_id, "score": s} for s in output["scores"].tolist()]
    # Detections of classes the source does not annotate cannot be scored against it.
    known = [i for i, c in enumerate(categories["thing"]) if c is not None]
    if "bbox" in results:
        boxes = output["boxes"][known].float()
        boxes = boxes * torch.tensor([scale_x, scale_y, scale_x, scale_y], device=boxes.device)
        for i, (x0, y0, x1, y1) in zip(known, boxes.tolist()):
            bbox = [x0, y0, x1 - x0, y1 - y0]
            results["bbox"].append({**base[i], "category_id": categories["thing"][i], "bbox": bbox})
    if "segm" in results and known:
        rles = encode_masks(output["masks"][known], record.height, record.width)
        for i, rle in zip(known, rles):
            # No "bbox" key: with one, loadRes takes the result for a box and its area from the box.
            results["segm"].append({**base[i], "category_id": categories["thing"][i], "segmentation": rle})
    if "keypoints" in results:
        # The source's own keypoints, in its order, out of the model's unified ones.
        assert spec.keypoint_indices is not None  # set for every source scored on keypoints
        points = output["keypoints"][:, list(spec.keypoint_indices)].float()
        points = points * torch.tensor([scale_x, scale_y, 1.0], device=points.device)
        for i, values in enumerate(points.flatten(1).tolist()):
            if categories["keypoints"][i] is not None:
                results["keypoints"].append({**base[i], "category_id": categories["keypoints"][i], "keypoints": values})
    return results


def valid_region(output: dict[str, Tensor], input_size: tuple[int, int]) -> dict[str, Tensor]:
    """``output`` with its dense predictions (``masks``, ``semantic_logits``, ``semantic``)
    cropped to the image's top-left ``input_size``: padding (bottom/right) is not part of
    the original image and must not be stretched into it."""
    height, width = input_size
    return {k: v[..., :height, :width] if k in ("masks", "semantic_logits", "semantic") else v
            for k, v in output.items()}


def _categories(labels: list[int], spec: SourceSpec) -> dict[str, list[int | None]]:
    """Per detection: its category id for box/mask results and for keypoint results (None: not scored)."""
    if spec.index_to_category is None:
        # Keypoint-only source: every detection is a candidate instance of its one keypoint category.
        return {"thing": [None] * len(labels), "keypoints": [spec.keypoint_category_ids[0]] * len(labels)}
    thing = [spec.index_to_category.get(label) for label in labels]
    return {"thing": thing, "keypoints": [c if c in spec.keypoint_category_ids else None for c in thing]}


def encode_masks(masks: Tensor, height: int, width: int) -> list[dict]:
    """[N, 1, h, w] probabilities -> compressed RLEs at the original (height, width)."""
    probs = F.interpolate(masks.float(), size=(height, width), mode="bilinear", align_corners=False)
    # Resized and thresholded where the model ran: only the uint8 masks cross to the host.
    binary = (probs[:, 0] > MASK_THRESHOLD).to(torch.uint8).cpu()
    rles = mask_utils.encode(np.asfortranarray(binary.permute(1, 2, 0).numpy()))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # json has no bytes
    return rles
