"""A point cloud as the memory's first content: ``reference.points`` (a scan, photogrammetry, a previous bundle).

The seed is a PLY file (``bridge/ply.py``: any PLY with ``x y z``, colours from ``red green blue`` when it has
them) or a COLMAP model folder (its ``points3D``, read by ``bridge/formats.py``), in the trajectories' world frame
(Blender's, metres: a COLMAP model is taken as its world is, as ``trajectory convert`` reads it). Its points go into
the memory before the reference is lifted, as frame 0 with confidence ``SEED_CONFIDENCE``, so the generator
continues the scanned location; the memory's point budget holds (voxel downsampling keeps the most confident point).

Without a reference depth, the reference is lifted at the seed's depth where the seed covers it (the seed
rendered at the reference camera), so it lines up with the scan instead of becoming a flat board.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...bridge import ply
from ...bridge.errors import KeyframeWorldsError
from ..world.memory import PointMemory

#: A measured scan is trusted like a given reference depth.
SEED_CONFIDENCE = 1.0
#: Colour of seed points whose file has none (mid grey, sRGB).
SEED_GREY = 128


@dataclass(frozen=True)
class SeedPoints:
    """positions_world: (N, 3) float32 metres; colors: (N, 3) uint8 sRGB; source: the file, in words, for the log."""

    positions_world: np.ndarray
    colors: np.ndarray
    source: str


def read_seed_points(path: str | Path) -> SeedPoints:
    """The points of a ``.ply`` file or a COLMAP model folder; raises ``KeyframeWorldsError`` naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        from ...bridge.formats import read_trajectory_set

        points = read_trajectory_set(path).points
        if points is None or len(points) == 0:
            raise KeyframeWorldsError(f"reference.points: the COLMAP model {path} has no points3D")
        xyz, rgb, what = points.xyz.astype(np.float32), points.rgb.astype(np.uint8), f"COLMAP points3D of {path}"
    else:
        data = ply.read_ply(path)
        if not all(k in data.vertex for k in ("x", "y", "z")):
            raise KeyframeWorldsError(f"reference.points: {path} has no x y z vertex properties")
        xyz = data.positions()
        rgb = data.colors_u8()
        what = f"PLY {path}" + ("" if rgb is not None else " (no colours: grey)")
        if rgb is None:
            rgb = np.full((len(xyz), 3), SEED_GREY, np.uint8)
    finite = np.isfinite(xyz).all(axis=1)
    if not finite.any():
        raise KeyframeWorldsError(f"reference.points: {path} has no finite points")
    return SeedPoints(np.ascontiguousarray(xyz[finite]), np.ascontiguousarray(rgb[finite]), what)


def seed_memory(memory: PointMemory, seed: SeedPoints) -> int:
    """Put the seed's points into ``memory`` (frame 0, ``SEED_CONFIDENCE``), keeping its budget; returns how many stayed."""
    memory.add_points(torch.from_numpy(seed.positions_world), torch.from_numpy(seed.colors), 0, SEED_CONFIDENCE)
    memory.enforce_budget()
    return len(memory)


def seed_depth_at(memory: PointMemory, c2w_opencv: torch.Tensor, k: torch.Tensor, width: int, height: int) -> np.ndarray:
    """(H, W) float32 z-depth in metres of the memory's points at one camera (0 where it has none)."""
    rendered = memory.render(c2w_opencv[None], k[None], width, height)
    depth = torch.where(rendered.mask[0], rendered.depth_z_m[0], torch.zeros_like(rendered.depth_z_m[0]))
    return depth.to(torch.float32).cpu().numpy()
