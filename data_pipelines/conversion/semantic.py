"""VOC-style semantic segmentation (images + one-channel PNG masks) -> shards."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.bad_data import BadRecords
from data_pipelines.conversion.images import image_files, inspect_image, require_dir
from data_pipelines.conversion.shard_writer import (
    DEFAULT_BAD_SAMPLE_POLICY,
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_ORDER,
    DEFAULT_ORDER_SEED,
    DEFAULT_SHARD_MAX_BYTES,
    DEFAULT_SHARD_MAX_SAMPLES,
    DEFAULT_WORKERS,
    Sample,
    caught,
    json_bytes,
    parallel_map,
    sample_key,
    write_source,
)
from data_pipelines.manifest import Manifest

_SEMANTIC_IGNORE = 255


def convert_semantic(
    images_dir: str | Path,
    masks_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    classes: Sequence[str],
    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
    workers: int = DEFAULT_WORKERS,
    bad_sample_policy: str = DEFAULT_BAD_SAMPLE_POLICY,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    order: str = DEFAULT_ORDER,
    order_seed: int = DEFAULT_ORDER_SEED,
) -> Manifest:
    """Convert a VOC-style semantic segmentation source.

    Every ``<stem>.png`` in ``masks_dir`` (one channel, ``L`` or palette ``P``, pixel =
    index in ``classes``, 255 = unlabelled) is paired with ``<stem>.jpg|.jpeg|.png`` in
    ``images_dir``; images without a mask are not part of the labelled set and are skipped,
    as with VOC's JPEGImages. The mask's PNG bytes are stored unchanged as ``<key>.seg.png``.

    Args:
        images_dir, masks_dir: the two directories (searched recursively).
        out_dir, name, shard_max_samples, shard_max_bytes, workers, bad_sample_policy,
            max_bad_fraction, order, order_seed: as in :func:`convert_coco`.
        classes: class names, index = pixel value (0 is usually background).

    Returns:
        The saved manifest, its ``root`` set to ``out_dir``.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    bad = BadRecords(bad_sample_policy, max_bad_fraction, where=str(masks_dir))
    require_dir(images_dir)
    require_dir(masks_dir)
    images_by_stem = {p.relative_to(images_dir).with_suffix("").as_posix(): p for p in image_files(images_dir)}
    mask_paths = sorted(masks_dir.rglob("*.png"))
    if not mask_paths:
        raise ValueError(f"{masks_dir}: no .png masks found")
    pairs = []
    for mask_path in mask_paths:
        stem = mask_path.relative_to(masks_dir).with_suffix("").as_posix()
        if stem not in images_by_stem:
            missing = FileNotFoundError(f"{mask_path}: no image {stem}.jpg/.jpeg/.png in {images_dir}")
            bad.report(str(mask_path), missing)
            continue
        pairs.append((images_by_stem[stem], mask_path))

    def check(pair: tuple[Path, Path]) -> tuple[str, int, int]:
        return _inspect_semantic_pair(*pair, num_classes=len(classes))

    infos = parallel_map(caught(check), pairs, workers=workers, desc=f"{name}: check images")
    good = bad.keep_good(pairs, infos, record=lambda pair: str(pair[1]))
    bad.check(len(mask_paths))
    samples = []
    # The index (the json's image id) counts kept pairs: ids stay 0..n-1.
    for index, ((image_path, mask_path), (ext, width, height)) in enumerate(good):
        file_name = image_path.relative_to(images_dir).as_posix()
        payload = {"image": {"id": index, "file_name": file_name, "width": width, "height": height}, "annotations": []}
        members = {ext: image_path, "json": json_bytes(payload), "seg.png": mask_path}
        samples.append(Sample(sample_key(file_name), members))

    manifest = Manifest(name=name, tasks=["semantic"], shards=[], semantic_classes=list(classes))
    return write_source(
        manifest,
        samples,
        Path(out_dir),
        where=str(masks_dir),
        shard_max_samples=shard_max_samples,
        shard_max_bytes=shard_max_bytes,
        workers=workers,
        order=order,
        order_seed=order_seed,
        skipped=bad.summary(len(mask_paths)) if bad.problems else None,
    )


def _inspect_semantic_pair(image_path: Path, mask_path: Path, *, num_classes: int) -> tuple[str, int, int]:
    """Decode image and mask; the mask must be a one-channel PNG of the image's size with known ids."""
    ext, width, height = inspect_image(image_path)
    try:
        with Image.open(mask_path) as mask:
            mask.load()
            fmt, mode, size = mask.format, mask.mode, mask.size
            values = np.unique(np.asarray(mask))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{mask_path}: not a decodable mask ({e})") from None
    if fmt != "PNG" or mode not in ("L", "P"):
        raise ValueError(f"{mask_path}: mask is {fmt} mode {mode}; expected a one-channel PNG (mode L or P)")
    if size != (width, height):
        raise ValueError(f"{mask_path}: mask is {size[0]}x{size[1]} but its image {image_path} is {width}x{height}")
    unknown = [int(v) for v in values if v >= num_classes and v != _SEMANTIC_IGNORE]
    if unknown:
        raise ValueError(f"{mask_path}: pixel values {unknown} are neither a class index (< {num_classes}) nor 255")
    return ext, width, height
