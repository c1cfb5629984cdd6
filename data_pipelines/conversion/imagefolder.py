"""ImageFolder (``root/<class_name>/<image>``) -> shards for image classification."""
from __future__ import annotations

from pathlib import Path

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


def convert_image_folder(
    root: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    shard_max_samples: int = DEFAULT_SHARD_MAX_SAMPLES,
    shard_max_bytes: int = DEFAULT_SHARD_MAX_BYTES,
    workers: int = DEFAULT_WORKERS,
    bad_sample_policy: str = DEFAULT_BAD_SAMPLE_POLICY,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    order: str = DEFAULT_ORDER,
    order_seed: int = DEFAULT_ORDER_SEED,
) -> Manifest:
    """Convert an ImageFolder source, ``root/<class_name>/<image>``.

    Class names are the sorted sub-directory names (empty ones included, so every split of
    a dataset gets the same list); ``class_id`` in ``<key>.json`` indexes them. Files that
    are not .jpg/.jpeg/.png are ignored, as torchvision's ImageFolder ignores them.

    Args:
        root: the directory holding one sub-directory per class.
        out_dir, name, shard_max_samples, shard_max_bytes, workers, bad_sample_policy,
            max_bad_fraction, order, order_seed: as in :func:`convert_coco`.

    Returns:
        The saved manifest, its ``root`` set to ``out_dir``.
    """
    root = Path(root)
    require_dir(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-directories")
    files = [(path, class_id) for class_id, c in enumerate(classes) for path in image_files(root / c)]
    if not files:
        raise ValueError(f"{root}: no .jpg/.jpeg/.png images in its class sub-directories")

    bad = BadRecords(bad_sample_policy, max_bad_fraction, where=str(root))
    paths = [path for path, _ in files]
    infos = parallel_map(caught(inspect_image), paths, workers=workers, desc=f"{name}: check images")
    good = bad.keep_good(files, infos, record=lambda file: str(file[0]))
    bad.check(len(files))
    samples = []
    # The index (the json's image id) counts kept images: ids stay 0..n-1.
    for index, ((path, class_id), (ext, width, height)) in enumerate(good):
        file_name = path.relative_to(root).as_posix()
        payload = {
            "image": {"id": index, "file_name": file_name, "width": width, "height": height},
            "annotations": [],
            "class_id": class_id,
        }
        samples.append(Sample(sample_key(file_name), {ext: path, "json": json_bytes(payload)}))

    manifest = Manifest(name=name, tasks=["classification"], shards=[], classes=classes)
    return write_source(
        manifest,
        samples,
        Path(out_dir),
        where=str(root),
        shard_max_samples=shard_max_samples,
        shard_max_bytes=shard_max_bytes,
        workers=workers,
        order=order,
        order_seed=order_seed,
        skipped=bad.summary(len(files)) if bad.problems else None,
    )
