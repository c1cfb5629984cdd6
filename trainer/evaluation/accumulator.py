"""Per-source evaluation state on one rank, and its merge over ranks on rank 0."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from trainer.evaluation.dense_metrics import TOP_K, ranked_classes, semantic_confusion
from data_pipelines.streaming.eval_loader import ImageRecord
from trainer.evaluation.predictions import coco_results, valid_region
from trainer.evaluation.source_spec import SourceSpec, outputs_of


@dataclass
class SourceAccumulator:
    """What one source's images produced: COCO results, confusion matrix, classifications.

    Small and picklable for the gather: masks are already RLE strings and dense outputs
    are reduced to counts.
    """

    image_ids: list[int] = field(default_factory=list)
    coco: dict[str, list[dict]] = field(default_factory=dict)  # iou type -> results
    confusion: Tensor | None = None  # semantic, [C, C] over the label space
    # Per classification task, one per image labelled for it: image_id, file_name, label and
    # the top-5 (label-space indices) with their probabilities over the source's classes
    # (top-k accuracy is counted from them).
    classifications: dict[str, list[dict]] = field(default_factory=dict)

    def add(
        self, output: dict[str, dict[str, Tensor]], record: ImageRecord, *, spec: SourceSpec,
        input_size: tuple[int, int]
    ) -> None:
        """Score one image; ``output`` is the model's (per task name), moved to the CPU, in
        the resized image's frame of (height, width) ``input_size`` (padding beyond it is
        dropped)."""
        flat = valid_region(outputs_of(output, spec), input_size)
        self.image_ids.append(record.image_id)
        for iou_type, results in coco_results(flat, record, spec, input_size=input_size).items():
            self.coco.setdefault(iou_type, []).extend(results)
        if spec.semantic_classes is not None:
            assert record.semantic is not None  # decoded for every semantic source
            counts = semantic_confusion(
                flat["semantic_logits"], record.semantic,
                classes=spec.semantic_classes, num_classes=spec.num_semantic_classes,
            )
            self.confusion = counts if self.confusion is None else self.confusion + counts
        for task, classes in spec.image_classes.items():
            label = record.class_labels.get(task)
            if label is None:  # this image is not labelled for the task
                continue
            ranked, probabilities = ranked_classes(output[task]["class_logits"], classes=classes)
            self.classifications.setdefault(task, []).append({
                "image_id": record.image_id, "file_name": record.file_name, "label": label,
                "top": ranked[:max(TOP_K)], "scores": probabilities[:max(TOP_K)],
            })

    @staticmethod
    def merge(parts: list["SourceAccumulator"]) -> "SourceAccumulator":
        merged = SourceAccumulator()
        for part in parts:
            merged.image_ids += part.image_ids
            for iou_type, results in part.coco.items():
                merged.coco.setdefault(iou_type, []).extend(results)
            if part.confusion is not None:
                merged.confusion = part.confusion if merged.confusion is None else merged.confusion + part.confusion
            for task, records in part.classifications.items():
                merged.classifications.setdefault(task, []).extend(records)
        return merged
