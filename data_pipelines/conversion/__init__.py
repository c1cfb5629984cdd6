"""Convert sources from their native on-disk formats into tar shards + ``manifest.json``.

Shard members follow the format in :mod:`data_pipelines.manifest`. Every converter runs
the same three steps:

1. read the source's index (COCO json, directory listing) and check its structure, and every
   annotation's fields as the decoder will (``annotation_check``);
2. decode every image (and mask) in parallel: a missing, unreadable or inconsistent file
   raises a ``FileNotFoundError``/``ValueError`` naming it *before* anything is written;
3. put the samples in a seeded random order (``order="shuffled"``, the default; the
   manifest records it and the seed) or keep the input's (``"original"``), then write the
   shards in parallel, each to a temporary name renamed when complete, then
   ``manifest.json`` last.

Bad input follows ``bad_sample_policy`` (see ``bad_data``): ``raise`` (the default) fails
at the first bad image or annotation as above; ``skip`` leaves each bad record out (an
image whose file or any annotation is bad, with all its annotations; an annotation that
names no image), logs it, lists it in ``skipped.json`` next to the manifest, and fails
before writing anything if more than ``max_bad_fraction`` of the records are bad.
Problems with the source as a whole (no index file, not JSON, missing top-level keys,
duplicate image ids, no images at all) fail under either policy.

One module per input format (``coco``, ``semantic``, ``imagefolder``, ``yolo``); all end in the one
shard writer (``shard_writer``).
"""
from data_pipelines.conversion.coco import (
    COCO_PERSON_KEYPOINTS,
    COCO_PERSON_SIGMAS,
    COCO_TASKS,
    DEFAULT_KEYPOINT_SIGMA,
    GROUND_TRUTH_NAME,
    convert_coco,
)
from data_pipelines.conversion.imagefolder import convert_image_folder
from data_pipelines.conversion.semantic import convert_semantic
from data_pipelines.conversion.shard_writer import (
    DEFAULT_BAD_SAMPLE_POLICY,
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_ORDER,
    DEFAULT_ORDER_SEED,
    DEFAULT_SHARD_MAX_BYTES,
    DEFAULT_SHARD_MAX_SAMPLES,
    DEFAULT_WORKERS,
    SKIPPED_NAME,
)
from data_pipelines.conversion.yolo import YOLO_TASKS, convert_yolo

__all__ = [
    "COCO_PERSON_KEYPOINTS", "COCO_PERSON_SIGMAS", "COCO_TASKS", "GROUND_TRUTH_NAME",
    "DEFAULT_BAD_SAMPLE_POLICY", "DEFAULT_KEYPOINT_SIGMA", "DEFAULT_MAX_BAD_FRACTION",
    "DEFAULT_ORDER", "DEFAULT_ORDER_SEED", "DEFAULT_SHARD_MAX_BYTES", "DEFAULT_SHARD_MAX_SAMPLES", "DEFAULT_WORKERS", "SKIPPED_NAME",
    "YOLO_TASKS", "convert_coco", "convert_image_folder", "convert_semantic", "convert_yolo",
]
