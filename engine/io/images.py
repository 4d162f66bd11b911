"""PNG frames and reference images (Pillow), written atomically."""

from __future__ import annotations

import os

import numpy as np

from ...bridge.atomic import atomic_write
from ...bridge.errors import KeyframeWorldsError


def write_png(path: str | os.PathLike, rgb: np.ndarray, compress_level: int = 1, text: dict[str, str] | None = None) -> None:
    """(H, W, 3) uint8 RGB as PNG, with optional tEXt entries.

    Level 1 is several times faster than the default and a little bigger.
    """
    from PIL import Image, PngImagePlugin

    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    with atomic_write(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(tmp, format="PNG", compress_level=compress_level, pnginfo=info)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Any image Pillow reads as (H, W, 3) uint8 RGB (alpha dropped, greyscale expanded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")).copy()
    except FileNotFoundError:
        raise KeyframeWorldsError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise KeyframeWorldsError(f"cannot read image {path}: {exc}") from None


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_write(path) as tmp:
        np.save(tmp, array)
