"""Tiny shards written directly in the manifest format (see data_pipelines/manifest.py)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from data_pipelines.manifest import KeypointSchema, Manifest, ShardInfo

KEYPOINT_SCHEMA = KeypointSchema(
    names=["nose", "left_hand", "right_hand"],
    skeleton=[[1, 2], [1, 3]],
    flip_map=[["left_hand", "right_hand"]],
    sigmas=[0.026, 0.062, 0.062],
)


def jpeg_bytes(height: int, width: int, *, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def sample_member(key: str, *, image: bytes, meta: dict, seg: bytes | None = None) -> dict:
    """One tar sample: ``<key>.jpg``, ``<key>.json`` and optionally ``<key>.seg.png``."""
    sample = {"__key__": key, "jpg": image, "json": json.dumps(meta).encode()}
    if seg is not None:
        sample["seg.png"] = seg
    return sample


def write_source(
    directory: Path,
    samples: list[dict],
    *,
    name: str,
    tasks: list[str],
    shard_size: int = 4,
    shard_sizes: list[int] | None = None,
    categories: list[dict] | None = None,
    keypoints: KeypointSchema | None = None,
    semantic_classes: list[str] | None = None,
    classes: list[str] | None = None,
) -> Manifest:
    """Write ``samples`` as shards of ``shard_size`` (or of the given ``shard_sizes``) plus
    manifest.json; returns the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    if shard_sizes is None:
        shard_sizes = [min(shard_size, len(samples) - s) for s in range(0, len(samples), shard_size)]
    assert sum(shard_sizes) == len(samples), (shard_sizes, len(samples))
    shards = []
    starts = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
    for i, (start, size) in enumerate(zip(starts, shard_sizes)):
        path = f"{name}-{i:06d}.tar"
        chunk = samples[start : start + size]
        with wds.TarWriter(str(directory / path)) as writer:
            for sample in chunk:
                writer.write(sample)
        shards.append(ShardInfo(path=path, num_samples=len(chunk), num_bytes=(directory / path).stat().st_size))
    manifest = Manifest(
        name=name,
        tasks=tasks,
        shards=shards,
        categories=categories or [],
        keypoints=keypoints,
        semantic_classes=semantic_classes or [],
        classes=classes or [],
        root=str(directory),
    )
    manifest.save(directory)
    return manifest


def boxed_sample(
    key: str, *, height: int, width: int, seed: int, category_id: int, class_id: int | None = None
) -> dict:
    """A sample with one instance (box, polygon, 3 keypoints) and a semantic mask of ids 0/1/255."""
    rng = np.random.default_rng(seed)
    x0, y0 = (int(v) for v in rng.integers(0, min(height, width) // 2, 2))
    w, h = width // 3, height // 3
    ann = {
        "id": seed,
        "image_id": seed,
        "category_id": category_id,
        "bbox": [x0, y0, w, h],
        "area": w * h,
        "iscrowd": 0,
        "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]],
        "keypoints": [x0 + 1, y0 + 1, 2, x0 + 2, y0 + 2, 1, 0, 0, 0],
        "num_keypoints": 2,
    }
    meta = {"image": {"id": seed, "file_name": f"{key}.jpg", "width": width, "height": height}, "annotations": [ann]}
    if class_id is not None:
        meta["class_id"] = class_id
    seg = np.zeros((height, width), dtype=np.uint8)
    seg[y0 : y0 + h, x0 : x0 + w] = 1
    seg[:, :2] = 255
    return sample_member(key, image=jpeg_bytes(height, width, seed=seed), meta=meta, seg=png_bytes(seg))
