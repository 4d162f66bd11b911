"""A Blender object as the memory's seed (``reference.points``): its evaluated points in world space, as PLY.

A mesh gives its evaluated vertices (modifiers applied), a point cloud its points (a previous bundle's
``points.ply`` imported by ``importers.import_point_cloud`` is one), each through the object's world matrix,
so the seed is in Blender's world frame, the trajectories' own. Colours come from a colour attribute when the
object has one (the active colour attribute, else the first; one per point, or the mean of a vertex's face
corners), in sRGB as PLY holds them; without one the points are grey.
"""

from __future__ import annotations

from pathlib import Path

import bpy
import numpy as np

from ..bridge.errors import KeyframeWorldsError
from ..bridge.seed import write_seed_ply

#: The object types that can seed the memory.
SEED_OBJECT_TYPES = ("MESH", "POINTCLOUD")
SEED_FILENAME = "seed_points.ply"


def seed_points_of(obj: bpy.types.Object, depsgraph) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, 3) float32 world positions and (N, 3) uint8 sRGB colours (or None) of ``obj`` as evaluated."""
    if obj.type not in SEED_OBJECT_TYPES:
        raise KeyframeWorldsError(f"object {obj.name!r} is a {obj.type.lower()}; the memory's seed must be a mesh or a point cloud")
    evaluated = obj.evaluated_get(depsgraph)
    matrix = np.array(evaluated.matrix_world, dtype=np.float64)
    if obj.type == "MESH":
        mesh = evaluated.to_mesh()
        try:
            local = np.empty(len(mesh.vertices) * 3, np.float32)
            mesh.vertices.foreach_get("co", local)
            colours = _colours(mesh, len(mesh.vertices), [loop.vertex_index for loop in mesh.loops])
        finally:
            evaluated.to_mesh_clear()
    else:
        cloud = evaluated.data
        local = np.empty(len(cloud.points) * 3, np.float32)
        cloud.attributes["position"].data.foreach_get("vector", local)
        colours = _colours(cloud, len(cloud.points), None)
    local = local.reshape(-1, 3).astype(np.float64)
    if not len(local):
        raise KeyframeWorldsError(f"object {obj.name!r} has no points to seed the memory with")
    world = local @ matrix[:3, :3].T + matrix[:3, 3]
    return world.astype(np.float32), colours


def _colours(data, count: int, corner_vertex: list[int] | None) -> np.ndarray | None:
    attributes = data.color_attributes
    attribute = getattr(attributes, "active_color", None) or (attributes[0] if len(attributes) else None)
    if attribute is None or attribute.domain not in ("POINT", "CORNER") or (attribute.domain == "CORNER" and corner_vertex is None):
        return None
    values = np.empty(len(attribute.data) * 4, np.float32)
    attribute.data.foreach_get("color_srgb", values)
    values = values.reshape(-1, 4)[:, :3]
    if attribute.domain == "CORNER":
        # A vertex's corners may differ (hard colour edges): its colour is their mean.
        sums = np.zeros((count, 3))
        np.add.at(sums, np.asarray(corner_vertex, np.int64), values)
        hits = np.bincount(np.asarray(corner_vertex, np.int64), minlength=count)[:, None]
        values = sums / np.maximum(hits, 1)
    return np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8)


def write_seed_object(obj: bpy.types.Object, depsgraph, job_dir: str | Path) -> str:
    """Write ``obj``'s points as the job's seed PLY in ``job_dir``; returns its name (for ``reference.points``)."""
    xyz, rgb = seed_points_of(obj, depsgraph)
    write_seed_ply(Path(job_dir) / SEED_FILENAME, xyz, rgb, f"Keyframe Worlds memory seed from Blender object {obj.name}")
    return SEED_FILENAME
