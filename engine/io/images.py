"""PNG frames and reference images (Pillow), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...bridge.errors import KeyframeWorldsError


def write_png(path: str | os.PathLike, rgb: np.ndarray, compress_level: int = 1, text: dict[str, str] | None = None) -> None:
    """(H, W, 3) uint8 RGB as PNG, with optional tEXt entries.

    Level 1 is several times faster than the default and a little bigger.
    """
    from PIL import Image, PngImagePlugin

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(tmp, format="PNG", compress_level=compress_level, pnginfo=info)
    os.replace(tmp, path)


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
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
