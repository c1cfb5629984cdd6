"""Embedded demo data: small procedural scenes written in the native formats of real datasets.

Every image is a textured, noisy colour gradient with flat-coloured shapes (circle, square,
triangle) or stick figures drawn on it. Labels come from the very geometry that was drawn,
so they match the pixels exactly and a model can learn them. Four sources, each labelling
only some tasks (``DEMO_TASKS``), laid out per split like the real thing::

    <out_dir>/shapes_instances/<split>/images/<NNNNNN>.jpg
                                      /annotations.json   COCO instances
    <out_dir>/shapes_keypoints/<split>/images/<NNNNNN>.jpg
                                      /annotations.json   COCO person-keypoints style
                                      /unannotated.json   the shapes drawn there but not
                                                          annotated (not read by converters)
    <out_dir>/shapes_semantic/<split>/images/<NNNNNN>.jpg
                                     /masks/<NNNNNN>.png  VOC style: palette PNG, pixel =
                                                          class id, 255 = object boundary
                                     /classes.json        class names, index 0 = background
    <out_dir>/shapes_classes/<split>/<class_name>/<NNNNNN>.jpg   ImageFolder

Partial annotation, as between real datasets: the keypoint images also hold shapes of the
instance source's classes (circle, square, triangle) that the keypoint source, which
annotates figures only, leaves unlabelled. Training them as background there would teach
the detector to miss them (bench/partial_classes.py measures it).

COCO does not carry keypoint flip pairs or OKS sigmas, so the keypoints category holds them
as two extra keys, ``"flip_map"`` ([left, right] name pairs) and ``"sigmas"``; COCO tools
ignore unknown keys and the converter reads them.
"""
from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

DEMO_TASKS: dict[str, list[str]] = {
    "shapes_instances": ["detection", "instance_mask"],
    # Person-keypoints style: the figures are labelled as boxes too, as COCO persons are.
    "shapes_keypoints": ["detection", "keypoints"],
    "shapes_semantic": ["semantic"],
    "shapes_classes": ["classification"],
}
DEFAULT_NUM_IMAGES: dict[str, int] = {"train": 160, "val": 40}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Non-contiguous on purpose, as in real COCO (ids 1..90 for 80 classes).
INSTANCE_CATEGORY_IDS: dict[str, int] = {"circle": 1, "square": 3, "triangle": 7}
SEMANTIC_CLASSES: list[str] = ["background", *SHAPES]

KEYPOINT_NAMES: list[str] = ["head", "neck", "left_hand", "right_hand", "pelvis", "left_foot", "right_foot"]
KEYPOINT_SKELETON: list[list[int]] = [[1, 2], [2, 3], [2, 4], [2, 5], [5, 6], [5, 7]]  # 1-based, as COCO
KEYPOINT_FLIP_MAP: list[list[str]] = [["left_hand", "right_hand"], ["left_foot", "right_foot"]]
KEYPOINT_SIGMAS: list[float] = [0.05, 0.05, 0.06, 0.06, 0.05, 0.07, 0.07]
# Figure joints in figure units, y down, facing the viewer (its left on the image right).
_FIGURE_LAYOUT = np.array([[0.0, -1.0], [0.0, -0.6], [0.7, -0.1], [-0.7, -0.1], [0.0, 0.2], [0.4, 1.0], [-0.4, 1.0]])
# Farthest a drawn figure reaches from its centre, in figure units (head tip, jitter included).
_FIGURE_REACH = 1.35

_JPEG_QUALITY = 90
_NOISE_STD = 6.0
# Minimum L1 colour distance (sum over RGB) between a shape and what lies under it.
_MIN_CONTRAST = 150
_VERTICES = {"circle": 32, "square": 4, "triangle": 3}
# VOC colour map for the first classes; 255 (boundary) in VOC's cream colour.
_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 0] * 251 + [224, 224, 192]


def generate_demo_data(
    out_dir: Path,
    *,
    seed: int = 0,
    num_images: dict[str, int] | None = None,
    image_size: int = 128,
) -> dict[str, dict[str, Path]]:
    """Write the four demo sources under ``out_dir`` (layout in the module docstring).

    Args:
        out_dir: directory to write into; created if needed.
        seed: the output is a pure function of ``seed`` (byte-identical reruns).
        num_images: images per split for every source, ``{split: count}``; the splits
            written are its keys. Default ``DEFAULT_NUM_IMAGES`` (160 train, 40 val).
        image_size: side of the square RGB images.

    Returns:
        ``{source: {split: split_dir}}``, e.g. ``{"shapes_instances": {"train":
        out_dir/"shapes_instances"/"train", "val": ...}, ...}``, sources in ``DEMO_TASKS`` order.
    """
    counts = DEFAULT_NUM_IMAGES if num_images is None else num_images
    bad = {split: n for split, n in counts.items() if n < 1}
    if bad:
        raise ValueError(f"num_images must be >= 1 per split, got {bad}")
    writers = {
        "shapes_instances": _write_instances,
        "shapes_keypoints": _write_keypoints,
        "shapes_semantic": _write_semantic,
        "shapes_classes": _write_classes,
    }
    raw: dict[str, dict[str, Path]] = {}
    for source, write in writers.items():
        raw[source] = {}
        for split, count in counts.items():
            split_dir = Path(out_dir) / source / split
            split_dir.mkdir(parents=True, exist_ok=True)
            # crc32, unlike hash(), is stable across processes, so each source/split has
            # its own reproducible stream that does not shift when another one changes.
            rng = np.random.default_rng([seed, zlib.crc32(f"{source}/{split}".encode())])
            write(split_dir, rng, count, image_size)
            raw[source][split] = split_dir
    return raw


# --- sources ------------------------------------------------------------------------------


def _write_instances(split_dir: Path, rng: np.random.Generator, count: int, size: int) -> None:
    """COCO instances: polygons, some compressed RLE, some crowd regions, some empty images."""
    images, annotations = [], []
    for index in range(count):
        image_id = index + 1
        canvas, draw = _canvas(rng, size)
        # Every 10th image is background only, as COCO keeps some unannotated images.
        num_objects = 0 if index % 10 == 9 else int(rng.integers(1, 5))
        has_crowd = index % 8 == 2
        discs = _place_discs(rng, size, num_objects + has_crowd, radius=(0.08 * size, 0.2 * size))
        if has_crowd:
            crowd_disc, discs = discs[0], discs[1:]
            annotations.append(_crowd_annotation(rng, canvas, draw, crowd_disc, len(annotations) + 1, image_id))
        for cx, cy, r in discs:
            ann_id = len(annotations) + 1
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            polygon = _shape_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
            draw.polygon(polygon, fill=_contrasting_colour(rng, _mean_colour(canvas, polygon)))
            ann = {"id": ann_id, "image_id": image_id, "category_id": INSTANCE_CATEGORY_IDS[shape], "iscrowd": 0}
            if ann_id % 4 == 0:  # some objects as compressed RLE, as in LVIS or model outputs
                mask = _rasterize([polygon], size)
                ann.update(segmentation=_compressed_rle(mask), area=float(mask.sum()), bbox=_mask_bbox(mask))
            else:
                flat = [c for point in polygon for c in point]
                ann["segmentation"] = [flat]
                ann["area"] = float(mask_utils.area(mask_utils.frPyObjects([flat], size, size))[0])
                xs, ys = flat[0::2], flat[1::2]
                ann["bbox"] = [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
            annotations.append(ann)
        file_name = _save_jpeg(canvas, split_dir / "images", index, rng)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for name, cid in INSTANCE_CATEGORY_IDS.items()]
    _write_coco(split_dir / "annotations.json", images, annotations, categories)


def _crowd_annotation(
    rng: np.random.Generator,
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    disc: tuple[float, float, float],
    ann_id: int,
    image_id: int,
) -> dict:
    """A cluster of tiny circles labelled as one iscrowd region with uncompressed RLE, as COCO does."""
    cx, cy, r = disc
    size = canvas.width
    polygons = []
    for _ in range(int(rng.integers(5, 9))):
        angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, r - 3)
        polygons.append(_shape_polygon("circle", cx + dist * math.cos(angle), cy + dist * math.sin(angle), 3.0, 0.0))
    colour = _contrasting_colour(rng, _mean_colour(canvas, _shape_polygon("circle", cx, cy, r, 0.0)))
    for polygon in polygons:
        draw.polygon(polygon, fill=colour)
    mask = _rasterize(polygons, size)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": INSTANCE_CATEGORY_IDS["circle"],
        "iscrowd": 1,
        "segmentation": _uncompressed_rle(mask),
        "area": float(mask.sum()),
        "bbox": _mask_bbox(mask),
    }


def _write_keypoints(split_dir: Path, rng: np.random.Generator, count: int, size: int) -> None:
    """COCO person-keypoints style: stick figures, some truncated (v=0) or occluded (v=1);
    beside them, unannotated shapes (listed in ``unannotated.json``)."""
    images, annotations, unannotated = [], [], []
    # Its own stream (spawning leaves ``rng``'s untouched): the figures stay as they were.
    shape_rng = rng.spawn(1)[0]
    for index in range(count):
        image_id = index + 1
        canvas, draw = _canvas(rng, size)
        # Centres may sit near the border so that some joints fall outside the image.
        discs = _place_discs(rng, size, int(rng.integers(1, 3)), radius=(0.2 * size, 0.32 * size), margin=0.12)
        figures = []  # (joints, colour, mask) per figure
        for cx, cy, r in discs:
            joints = _figure_joints(rng, cx, cy, r / _FIGURE_REACH)
            colour = _contrasting_colour(rng, _mean_colour(canvas, joints))
            figures.append((joints, colour, _draw_figure(draw, joints, r / _FIGURE_REACH, colour, size)))
        occluded = np.zeros((size, size), dtype=bool)
        for joints, colour, _ in figures:
            if rng.random() < 0.35:  # a patch in front of one hand or foot
                x, y = joints[int(rng.choice([2, 3, 5, 6]))]
                half = rng.uniform(0.05, 0.08) * size
                corners = [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
                draw.polygon(corners, fill=_contrasting_colour(rng, np.array(colour, dtype=float)))
                occluded |= _rasterize([corners], size)
        for joints, _, figure_mask in figures:
            visible = figure_mask & ~occluded
            if not visible.any():
                continue
            keypoints = []
            for x, y in joints:
                if 0 <= x < size and 0 <= y < size:
                    keypoints += [float(x), float(y), 1 if occluded[int(y), int(x)] else 2]
                else:
                    keypoints += [0, 0, 0]  # outside the image: not labelled, as in COCO
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": 1,
                "iscrowd": 0,
                "keypoints": keypoints,
                "num_keypoints": sum(v > 0 for v in keypoints[2::3]),
                "segmentation": _compressed_rle(visible),
                "area": float(visible.sum()),
                "bbox": _mask_bbox(visible),
            })
        # Clear of the figures (discs of their reach), so no figure pixel or keypoint changes.
        for cx, cy, r in _place_discs(shape_rng, size, int(shape_rng.integers(1, 3)),
                                      radius=(0.08 * size, 0.16 * size), avoid=discs):
            shape = SHAPES[int(shape_rng.integers(len(SHAPES)))]
            polygon = _shape_polygon(shape, cx, cy, r, shape_rng.uniform(0, 2 * math.pi))
            draw.polygon(polygon, fill=_contrasting_colour(shape_rng, _mean_colour(canvas, polygon)))
            unannotated.append({"image_id": image_id, "name": shape, "bbox": _mask_bbox(_rasterize([polygon], size))})
        file_name = _save_jpeg(canvas, split_dir / "images", index, rng)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    (split_dir / "unannotated.json").write_text(json.dumps(unannotated))
    category = {
        "id": 1,
        "name": "figure",
        "supercategory": "figure",
        "keypoints": KEYPOINT_NAMES,
        "skeleton": KEYPOINT_SKELETON,
        "flip_map": KEYPOINT_FLIP_MAP,
        "sigmas": KEYPOINT_SIGMAS,
    }
    _write_coco(split_dir / "annotations.json", images, annotations, [category])


def _figure_joints(rng: np.random.Generator, cx: float, cy: float, scale: float) -> np.ndarray:
    """Joint positions [K, 2]: the layout jittered, tilted a little, scaled and centred."""
    layout = _FIGURE_LAYOUT + rng.uniform(-0.1, 0.1, _FIGURE_LAYOUT.shape)
    tilt = rng.uniform(-0.3, 0.3)
    rotation = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])
    return np.round(layout @ rotation.T * scale + [cx, cy], 2)


def _draw_figure(
    draw: ImageDraw.ImageDraw, joints: np.ndarray, scale: float, colour: tuple[int, int, int], size: int
) -> np.ndarray:
    """Draw limbs, joint dots and head; return the same drawing as a bool mask."""
    mask_image = Image.new("L", (size, size), 0)
    width = max(2, int(scale / 6))
    head = 0.2 * scale
    for target, fill in ((draw, colour), (ImageDraw.Draw(mask_image), 1)):
        for a, b in KEYPOINT_SKELETON:
            target.line([tuple(joints[a - 1]), tuple(joints[b - 1])], fill=fill, width=width)
        for x, y in joints:
            target.ellipse((x - width, y - width, x + width, y + width), fill=fill)
        hx, hy = joints[0]
        target.ellipse((hx - head, hy - head, hx + head, hy + head), fill=fill)
    return np.array(mask_image, dtype=bool)


def _write_semantic(split_dir: Path, rng: np.random.Generator, count: int, size: int) -> None:
    """VOC-style segmentation: palette PNG of class ids, 255 on a band around each object."""
    (split_dir / "masks").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        canvas, draw = _canvas(rng, size)
        labels = np.zeros((size, size), dtype=np.uint8)
        boundary = np.zeros((size, size), dtype=bool)
        for cx, cy, r in _place_discs(rng, size, int(rng.integers(1, 5)), radius=(0.08 * size, 0.2 * size)):
            class_id = int(rng.integers(1, len(SEMANTIC_CLASSES)))
            polygon = _shape_polygon(SEMANTIC_CLASSES[class_id], cx, cy, r, rng.uniform(0, 2 * math.pi))
            draw.polygon(polygon, fill=_contrasting_colour(rng, _mean_colour(canvas, polygon)))
            shape = _rasterize([polygon], size)
            labels[shape] = class_id
            # VOC marks a thin band on object edges as "don't care": edge pixels are ambiguous.
            shape_image = Image.fromarray(shape.astype(np.uint8) * 255)
            grown = np.array(shape_image.filter(ImageFilter.MaxFilter(3))) > 0
            shrunk = np.array(shape_image.filter(ImageFilter.MinFilter(3))) > 0
            boundary |= grown & ~shrunk
        labels[boundary] = 255
        mask = Image.fromarray(labels)
        mask.putpalette(_PALETTE)  # turns the "L" image into "P", pixel values unchanged
        _save_jpeg(canvas, split_dir / "images", index, rng)
        mask.save(split_dir / "masks" / f"{index:06d}.png", format="PNG")
    (split_dir / "classes.json").write_text(json.dumps(SEMANTIC_CLASSES))


def _write_classes(split_dir: Path, rng: np.random.Generator, count: int, size: int) -> None:
    """ImageFolder: one large shape gives the class, up to two much smaller shapes distract;
    all black or white, for the most contrast. (In random colours, with the large shape
    smaller, 300 demo steps from scratch did not learn it: top-1 stayed near chance.)"""
    for name in SHAPES:  # every class folder exists, so every split has the same class list
        (split_dir / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        class_name = SHAPES[index % len(SHAPES)]
        canvas, draw = _canvas(rng, size)
        main = _place_discs(rng, size, 1, radius=(0.3 * size, 0.4 * size))
        small = _place_discs(rng, size, int(rng.integers(0, 3)), radius=(0.05 * size, 0.08 * size), avoid=main)
        others = [s for s in SHAPES if s != class_name]
        shapes = [class_name] + [others[int(rng.integers(len(others)))] for _ in small]
        for shape, (cx, cy, r) in zip(shapes, main + small):
            polygon = _shape_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
            draw.polygon(polygon, fill=_black_or_white(_mean_colour(canvas, polygon)))
        _save_jpeg(canvas, split_dir / class_name, index, rng)


# --- drawing ------------------------------------------------------------------------------


def _canvas(rng: np.random.Generator, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A gradient between two random colours in a random direction, with a sinusoidal grain."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    start, end = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / (t.max() - t.min())
    image = start + t[..., None] * (end - start)
    grain_angle, frequency, phase = rng.uniform(0, 2 * math.pi), rng.uniform(2, 6), rng.uniform(0, 2 * math.pi)
    grain = np.sin(2 * math.pi * frequency * (xx * math.cos(grain_angle) + yy * math.sin(grain_angle)) + phase)
    image = np.clip(image + 12 * grain[..., None], 0, 255).astype(np.uint8)
    canvas = Image.fromarray(image)
    return canvas, ImageDraw.Draw(canvas)


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Regular polygon inscribed in the circle (cx, cy, r); a circle is a 32-gon.

    Coordinates are rounded to 2 decimals (as COCO stores them) before drawing, so the
    drawn shape and the stored polygon are the same.
    """
    n = _VERTICES[shape]
    angles = [angle + 2 * math.pi * k / n for k in range(n)]
    return [(round(cx + r * math.cos(a), 2), round(cy + r * math.sin(a), 2)) for a in angles]


def _place_discs(
    rng: np.random.Generator,
    size: int,
    count: int,
    *,
    radius: tuple[float, float],
    margin: float | None = None,
    avoid: Sequence[tuple[float, float, float]] = (),
) -> list[tuple[float, float, float]]:
    """Up to ``count`` non-overlapping discs (cx, cy, r): shapes never occlude each other,
    so every mask is exactly the visible shape.

    Discs lie fully inside the image unless ``margin`` (fraction of ``size``) is given, in
    which case only the centre is kept ``margin * size`` away from the border. Discs in
    ``avoid`` (placed earlier) are not overlapped either and are not returned.
    """
    discs: list[tuple[float, float, float]] = []
    for _ in range(50 * count):
        if len(discs) == count:
            break
        r = rng.uniform(*radius)
        border = r + 2 if margin is None else margin * size
        cx, cy = rng.uniform(border, size - border, 2)
        if all(math.hypot(cx - x, cy - y) > r + q + 3 for x, y, q in [*discs, *avoid]):
            discs.append((float(cx), float(cy), float(r)))
    return discs


def _mean_colour(canvas: Image.Image, points) -> np.ndarray:
    """Mean RGB of the canvas in the bounding box of ``points`` (clipped to the image)."""
    xs = np.clip([p[0] for p in points], 0, canvas.width - 1)
    ys = np.clip([p[1] for p in points], 0, canvas.height - 1)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return np.asarray(canvas.crop(box), dtype=float).reshape(-1, 3).mean(axis=0)


def _black_or_white(reference: np.ndarray) -> tuple[int, int, int]:
    """Black on a light background, white on a dark one: the most contrast there is."""
    return (0, 0, 0) if reference.mean() > 127 else (255, 255, 255)


def _contrasting_colour(rng: np.random.Generator, reference: np.ndarray) -> tuple[int, int, int]:
    """A random colour far from ``reference``, so what is drawn stands out from what lies under it."""
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - reference).sum() >= _MIN_CONTRAST:
            return tuple(int(c) for c in colour)


def _rasterize(polygons: list[list[tuple[float, float]]], size: int) -> np.ndarray:
    """Bool mask of ``polygons`` rasterized exactly as ``ImageDraw.polygon`` drew them."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    for polygon in polygons:
        draw.polygon(polygon, fill=1)
    return np.array(image, dtype=bool)


def _save_jpeg(canvas: Image.Image, directory: Path, index: int, rng: np.random.Generator) -> str:
    """Add sensor-like noise over everything drawn and save; returns the file name."""
    noisy = np.asarray(canvas, dtype=float) + rng.normal(0, _NOISE_STD, (canvas.height, canvas.width, 3))
    directory.mkdir(parents=True, exist_ok=True)
    file_name = f"{index:06d}.jpg"
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    image.save(directory / file_name, format="JPEG", quality=_JPEG_QUALITY)
    return file_name


# --- COCO encoding ------------------------------------------------------------------------


def _compressed_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE with ``counts`` as a utf-8 str, as it is stored in COCO json."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("utf-8")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (crowd regions): run lengths down the columns, starting with a 0-run.

    pycocotools decodes this form (``frPyObjects``) but only encodes the compressed one.
    """
    flat = mask.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {"size": list(mask.shape), "counts": counts}


def _mask_bbox(mask: np.ndarray) -> list[float]:
    """Tight [x, y, w, h] around the mask's pixels."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> None:
    coco = {
        "info": {"description": "polytask procedural demo data", "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    path.write_text(json.dumps(coco))
