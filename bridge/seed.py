"""The point cloud that seeds a job's memory (``reference.points``): read from a PLY or a COLMAP model, written as PLY.

A seed is a PLY file (any PLY with ``x y z`` vertices; colours from ``red green blue`` when it has them: a
scan, photogrammetry, lidar, a previous bundle's ``points.ply``) or a COLMAP model folder (its ``points3D``),
in the trajectories' world frame (metres; a COLMAP model's world is taken as it is, as ``formats.py`` reads it).
What travels with a job (an upload, a copy into the engine's job folder, the add-on's export of a Blender
object) is always the PLY form ``write_seed_ply`` writes, so the engine reads one kind of file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ply
from .errors import KeyframeWorldsError

#: Colour of seed points whose file has none (mid grey, sRGB).
SEED_GREY = 128


@dataclass(frozen=True)
class SeedPoints:
    """positions_world: (N, 3) float32 metres (world frame of the trajectories); colors: (N, 3) uint8 sRGB;
    source: what they were read from, in words, for the log."""

    positions_world: np.ndarray
    colors: np.ndarray
    source: str


def read_seed_points(path: str | os.PathLike, what: str = "reference.points") -> SeedPoints:
    """The finite points of a ``.ply`` file or a COLMAP model folder; raises ``KeyframeWorldsError`` naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        from .formats import read_trajectory_set

        points = read_trajectory_set(path).points
        if points is None or len(points) == 0:
            raise KeyframeWorldsError(f"{what}: the COLMAP model {path} has no points3D")
        xyz, rgb, source = points.xyz.astype(np.float32), points.rgb.astype(np.uint8), f"COLMAP points3D of {path}"
    else:
        data = ply.read_ply(path)
        if not all(k in data.vertex for k in ("x", "y", "z")):
            raise KeyframeWorldsError(f"{what}: {path} has no x y z vertex properties")
        xyz, rgb = data.positions(), data.colors_u8()
        source = f"PLY {path}" + ("" if rgb is not None else " (no colours: grey)")
        if rgb is None:
            rgb = np.full((len(xyz), 3), SEED_GREY, np.uint8)
    finite = np.isfinite(xyz).all(axis=1)
    if not finite.any():
        raise KeyframeWorldsError(f"{what}: {path} has no finite points")
    return SeedPoints(np.ascontiguousarray(xyz[finite]), np.ascontiguousarray(rgb[finite]), source)


def write_seed_ply(path: str | os.PathLike, positions_world: np.ndarray, colors: np.ndarray | None = None,
                   comment: str = "Keyframe Worlds memory seed") -> None:
    """A seed as binary PLY: (N, 3) world positions in metres, (N, 3) uint8 sRGB colours (None: grey)."""
    xyz = np.asarray(positions_world, dtype=np.float32).reshape(-1, 3)
    if len(xyz) == 0:
        raise KeyframeWorldsError("a memory seed needs at least one point")
    rgb = np.full((len(xyz), 3), SEED_GREY, np.uint8) if colors is None else np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    ply.write_ply(path, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]},
                  comments=(comment.encode("ascii", "replace").decode(),))


def seed_as_ply(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy the seed at ``source`` (PLY or COLMAP folder) to ``target`` as the PLY a job carries."""
    seed = read_seed_points(source)
    write_seed_ply(target, seed.positions_world, seed.colors, f"Keyframe Worlds memory seed from {Path(source).name}")
