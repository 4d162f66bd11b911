"""The reference image and depth files of a job, read with the spec's size limits checked before decoding.

Every reader here checks the size the file declares (PNG/JPEG/WebP/TIFF through
Pillow's lazy ``Image.open``, which reads the header only; OpenEXR through its
header; ``.npy`` through numpy's header reader) against ``MIN_SIZE_PX``-
``MAX_SIZE_PX`` per side before any pixel is decoded, so a small file that
declares 20000x20000 is refused in microseconds and a few bytes of memory.
Then it decodes everything, so a truncated or corrupt file is found here, by
``validate`` and at submission, and not halfway through a run. Each failure is
one ``KeyframeWorldsError`` line naming the file and what is wrong.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ...bridge.errors import KeyframeWorldsError, Problem
from ...bridge.imageinfo import npy_info
from ...bridge.trajectory import MAX_SIZE_PX, MIN_SIZE_PX


def _check_side(path, width: int, height: int, what: str) -> None:
    if not (MIN_SIZE_PX <= width <= MAX_SIZE_PX and MIN_SIZE_PX <= height <= MAX_SIZE_PX):
        raise KeyframeWorldsError(f"{what}: {path} is {width}x{height} px; each side must be {MIN_SIZE_PX}-{MAX_SIZE_PX} px")


def read_reference_rgb(path: str | os.PathLike, what: str = "reference.image") -> np.ndarray:
    """(H, W, 3) uint8 RGB of the reference image; its declared size is checked before decoding.

    OpenEXR (linear light) is clipped to 0-1 and encoded as sRGB; every other kind goes through Pillow.
    """
    path = Path(path)
    if path.suffix.lower() == ".exr":
        from .exr import exr_size, read_exr

        width, height = exr_size(path)
        _check_side(path, width, height, what)
        channels = read_exr(path)
        try:
            linear = np.stack([channels[c] for c in "RGB"], -1)
        except KeyError:
            raise KeyframeWorldsError(f"{what}: {path} has no R, G and B channels (it has {', '.join(channels)})") from None
        linear = np.clip(np.nan_to_num(linear, nan=0.0), 0.0, 1.0)
        srgb = np.where(linear <= 0.0031308, linear * 12.92, 1.055 * np.power(linear, 1 / 2.4) - 0.055)
        return np.round(srgb * 255).astype(np.uint8)
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked here, against our limit
            with Image.open(path) as image:
                _check_side(path, image.width, image.height, what)
                return np.asarray(image.convert("RGB")).copy()
    except Image.DecompressionBombError as exc:  # over Pillow's own limit (2x MAX_IMAGE_PIXELS): far over ours
        raise KeyframeWorldsError(f"{what}: {path} declares more pixels than allowed ({exc}); "
                                  f"each side must be {MIN_SIZE_PX}-{MAX_SIZE_PX} px") from None
    except FileNotFoundError:
        raise KeyframeWorldsError(f"{what}: image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise KeyframeWorldsError(f"{what}: cannot read image {path}: {exc}") from None


def read_reference_depth(path: str | os.PathLike, what: str = "reference.depth") -> np.ndarray:
    """(H, W) float32 z-depth in metres (non-finite and non-positive values as 0); the header is checked first."""
    path = Path(path)
    if path.suffix.lower() == ".exr":
        from .exr import exr_size, read_depth_exr

        width, height = exr_size(path)
        _check_side(path, width, height, what)
        depth = read_depth_exr(path)
    else:
        try:
            npy_info(path, MIN_SIZE_PX, MAX_SIZE_PX)
        except ValueError as exc:
            raise KeyframeWorldsError(f"{what}: {path} {exc}") from None
        try:
            depth = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise KeyframeWorldsError(f"{what}: cannot read {path}: {exc}") from None
    depth = np.asarray(depth)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2 or depth.dtype.kind not in "fiu":
        raise KeyframeWorldsError(f"{what}: {path} must hold a 2-D array of depths in metres, got shape {depth.shape} {depth.dtype}")
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
    if not (depth > 0).any():
        raise KeyframeWorldsError(f"{what}: {path} has no positive, finite depth")
    return depth


def check_depth_matches(depth: np.ndarray, rgb: np.ndarray, depth_path, image_path) -> None:
    """A depth map of another size than its image is refused: resampling it would silently misplace every edge."""
    if depth.shape[:2] != rgb.shape[:2]:
        raise KeyframeWorldsError(
            f"reference.depth: {depth_path} is {depth.shape[1]}x{depth.shape[0]} but reference.image {image_path} is "
            f"{rgb.shape[1]}x{rgb.shape[0]}: give the depth at the image's size")


def reference_problems(image: str | os.PathLike | None, depth: str | os.PathLike | None) -> list[Problem]:
    """Every problem of the reference files' content (each read in full, limits first); never raises."""
    problems: list[Problem] = []
    rgb = depth_map = None
    for key, path, reader in (("image", image, read_reference_rgb), ("depth", depth, read_reference_depth)):
        if path is None:
            continue
        try:
            value = reader(path)
        except KeyframeWorldsError as exc:
            problems.append(Problem(f"reference.{key}", str(exc).removeprefix(f"reference.{key}: ")))
            continue
        except MemoryError:
            problems.append(Problem(f"reference.{key}", f"{path} is too large to read into memory"))
            continue
        if key == "image":
            rgb = value
        else:
            depth_map = value
    if rgb is not None and depth_map is not None:
        try:
            check_depth_matches(depth_map, rgb, depth, image)
        except KeyframeWorldsError as exc:
            problems.append(Problem("reference.depth", str(exc).removeprefix("reference.depth: ")))
    return problems
