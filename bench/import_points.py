"""Importing a coloured point cloud: ours (PointCloud object, colour + radius, material) vs Blender's own PLY import.

Both read the same binary PLY of N points (float32 xyz + uchar rgb) written by
`bridge.ply`. Blender's `bpy.ops.wm.ply_import` (C++) makes a mesh with byte colours;
ours makes the finished PointCloud object the add-on shows. A plain numpy-to-mesh
`foreach_set` path with float colours is timed too, for reference.

    .venv/bin/python bench/import_points.py [--points 5000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import bpy
import numpy as np

from _common import print_result


def reset():
    bpy.ops.wm.read_homefile(app_template="", use_empty=True)


def native(path: Path) -> None:
    bpy.ops.wm.ply_import(filepath=str(path), import_colors="SRGB", forward_axis="Y", up_axis="Z")


def ours(path: Path) -> None:
    from keyframe_worlds.addon.importers import import_point_cloud

    collection = bpy.data.collections.new("bench")
    bpy.context.scene.collection.children.link(collection)
    import_point_cloud(path, "points", collection)


def numpy_mesh(path: Path) -> None:
    from keyframe_worlds.bridge.ply import read_ply

    data = read_ply(path)
    mesh = bpy.data.meshes.new("np")
    mesh.vertices.add(data.count)
    mesh.vertices.foreach_set("co", data.positions().ravel())
    colours = np.ones((data.count, 4), np.float32)
    colours[:, :3] = data.colors_u8() / 255.0
    mesh.color_attributes.new("color", "FLOAT_COLOR", "POINT").data.foreach_set("color", colours.ravel())


def timed(fn, path: Path) -> float:
    reset()
    t0 = time.perf_counter()
    fn(path)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=5_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from keyframe_worlds.bridge.ply import write_ply

    rng = np.random.default_rng(0)
    pts = rng.normal(size=(args.points, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (args.points, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cloud.ply"
        write_ply(path, {"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2], "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]})
        timed(native, path)  # warm the file cache
        samples = {"native": [], "ours": [], "numpy": []}
        for _ in range(args.repeat):  # interleaved: the same noise for all
            samples["native"].append(timed(native, path))
            samples["ours"].append(timed(ours, path))
            samples["numpy"].append(timed(numpy_mesh, path))
        timed(ours, path)
        obj = bpy.data.objects["points"]
        assert obj.type == "POINTCLOUD" and len(obj.data.points) == args.points
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{args.points:,} points, {args.repeat} runs each (medians)")
    print(f"  Blender bpy.ops.wm.ply_import (mesh):        {med['native']:.3f} s")
    print(f"  ours, PointCloud with colour/radius/material: {med['ours']:.3f} s")
    print(f"  numpy -> mesh foreach_set, float colours:     {med['numpy']:.3f} s")
    print(f"  ratio ours / native: {med['ours'] / med['native']:.3f} (target <= 1.15)")
    print_result(points=args.points, native_s=med["native"], ours_s=med["ours"], numpy_s=med["numpy"],
                 ratio_vs_native=med["ours"] / med["native"])


if __name__ == "__main__":
    main()
