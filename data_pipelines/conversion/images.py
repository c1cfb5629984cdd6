"""Checks of the input files every converter runs before writing: directories exist, every
image decodes fully (``verify()`` alone misses truncated JPEGs) and is JPEG or PNG."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

# Shard member extension for each image format PIL reports; the bytes are copied unchanged.
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def require_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: source directory does not exist")


def image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def inspect_image(path: Path) -> tuple[str, int, int]:
    """Fully decode ``path``; ``verify()`` alone misses truncated JPEGs.

    Returns:
        (shard member extension, width, height).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            fmt, size = image.format, image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL: unreadable or corrupt
        raise ValueError(f"{path}: not a decodable image ({e})") from None
    if fmt not in IMAGE_EXTENSIONS:
        raise ValueError(f"{path}: image format {fmt}; shards hold JPEG or PNG images")
    return IMAGE_EXTENSIONS[fmt], *size
