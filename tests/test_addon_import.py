"""Importing a result bundle into Blender: placement in world space, one collection per job, replaced on re-import."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from keyframe_worlds.bridge import spec
from keyframe_worlds.bridge.ply import read_ply, write_ply
from keyframe_worlds.bridge.trajectory import Trajectory

W, H = 48, 32


def looking_down(height: float, x: float) -> np.ndarray:
    """c2w_opencv of a camera at (x, 0, height) looking straight down (-Z), image up = world +Y."""
    c2w = np.eye(4)
    c2w[:3, :3] = np.array([[1, 0, 0], [0, -1, 0], [0, 0, -1]], float).T @ np.eye(3)
    c2w[:3, :3] = np.column_stack([(1, 0, 0), (0, -1, 0), (0, 0, -1)])
    c2w[:3, 3] = (x, 0, height)
    return c2w


def make_bundle(folder, name="shot", frames=(1, 2, 3, 4), height=5.0, with_step_box=False, mesh_every=2, mesh_stride=4):
    """A bundle over the ground plane z = 0 seen from above, written by the engine's own bundle writer (frames,
    depth, meshes every ``mesh_every`` frames, point cloud, manifest); optionally a raised box that makes a depth jump."""
    from keyframe_worlds.engine.run.bundle import BundleWriter

    n = len(frames)
    traj = Trajectory(name="Cam", frames=list(frames), c2w_opencv=np.stack([looking_down(height, 0.2 * i) for i in range(n)]),
                      fx=40.0, fy=40.0, cx=W / 2, cy=H / 2, width=W, height=H, fps=24)
    writer = BundleWriter(folder, name, "preview", "geometric preview")
    output = writer.trajectory(traj)
    for i in range(n):
        depth = np.full((H, W), height, np.float32)
        if with_step_box:
            depth[8:20, 10:24] = height - 2.0  # top of a 2 m box
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[..., 0] = np.linspace(0, 255, W, dtype=np.uint8)[None]
        rgb[..., 1] = 40 * i
        output.write_frame(i, rgb, depth)
        if i % mesh_every == 0:
            output.write_mesh(i, depth, mesh_stride)
    output.flush()
    writer.add(output)
    rng = np.random.default_rng(1)
    pts = np.column_stack([rng.uniform(-2, 2, 500), rng.uniform(-1, 1, 500), np.zeros(500)]).astype(np.float32)
    rgb = rng.integers(0, 256, (500, 3), dtype=np.uint8)
    writer.write_point_cloud(pts, rgb, np.ones(500, np.float32), np.zeros(500, np.int32))
    writer.finish()
    return traj, pts, rgb


def mesh_vertices(obj) -> np.ndarray:
    co = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", co)
    return (np.array(obj.matrix_world) @ np.column_stack([co.reshape(-1, 3), np.ones(len(co) // 3)]).T).T[:, :3]


def test_import_places_everything_in_world_space(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.importers import ImportOptions, import_bundle

    traj, pts, rgb = make_bundle(tmp_path)
    result = import_bundle(bpy.context.scene, tmp_path, ImportOptions())
    assert result.collection.name == "KFW shot"
    manifest = spec.load_manifest(tmp_path)
    assert [o.name for o in result.meshes] == ["Cam depth 1", "Cam depth 3"] == [f"Cam depth {m.frame}" for m in manifest.meshes]
    for obj, index, entry in zip(result.meshes, (0, 2), manifest.meshes):
        # exactly the bundle's mesh: its vertices, in its order, and its triangles
        ply_mesh = read_ply(tmp_path / entry.path)
        v = mesh_vertices(obj)
        assert len(obj.data.vertices) == ply_mesh.count and len(obj.data.polygons) == len(ply_mesh.faces)
        np.testing.assert_allclose(v, ply_mesh.positions(), atol=1e-5)
        polys = np.empty(len(obj.data.polygons) * 3, np.int32)
        obj.data.polygons.foreach_get("vertices", polys)
        np.testing.assert_array_equal(polys.reshape(-1, 3), ply_mesh.faces)
        # The depth of a plane at distance 5 unprojects onto the plane z = 0, inside the camera's footprint.
        np.testing.assert_allclose(v[:, 2], 0.0, atol=1e-5)
        # Columns 0, 4, ..., 44 and the last, 47: pixel centres u + 0.5, seen from 5 m with fx = 40.
        cols = np.array(list(range(0, W, 4)) + [W - 1]) + 0.5
        expected_x = traj.c2w_opencv[index, 0, 3] + (cols - W / 2) * 5.0 / 40.0
        np.testing.assert_allclose(np.unique(np.round(v[:, 0], 5)), np.round(expected_x, 5), atol=1e-5)
        assert len(obj.data.vertices) == len(cols) * (len(range(0, H, 4)) + 1)  # bounded by the stride
        assert obj.data.uv_layers and obj.data.materials[0].node_tree.nodes.get("Image Texture").image is not None
    cloud = result.point_cloud
    assert cloud.type == "POINTCLOUD" and len(cloud.data.points) == 500
    pos = np.empty(1500, np.float32)
    cloud.data.attributes["position"].data.foreach_get("vector", pos)
    np.testing.assert_allclose(pos.reshape(-1, 3), pts)
    col = np.empty(2000, np.float32)
    cloud.data.attributes["color"].data.foreach_get("color_srgb", col)
    np.testing.assert_allclose(np.round(col.reshape(-1, 4)[:, :3] * 255), rgb)
    assert "radius" in cloud.data.attributes
    # A camera was created (the scene had none named Cam) with the frames as its background.
    cam = result.cameras[0]
    assert cam.name == "Cam" and cam.data.show_background_images
    bg = cam.data.background_images[0]
    assert bg.image.source == "SEQUENCE" and bg.image_user.frame_start == 1 and bg.image_user.frame_duration == 4


def test_reimport_replaces_the_collection(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.importers import import_bundle

    make_bundle(tmp_path)
    import_bundle(bpy.context.scene, tmp_path)
    meshes, clouds = len(bpy.data.meshes), len(bpy.data.pointclouds)
    import_bundle(bpy.context.scene, tmp_path)
    assert [c.name for c in bpy.data.collections if c.name.startswith("KFW ")] == ["KFW shot"]
    assert (len(bpy.data.meshes), len(bpy.data.pointclouds)) == (meshes, clouds)
    assert len(bpy.data.collections["KFW shot"].objects) == len(bpy.context.scene.objects)


def test_depth_discontinuities_are_not_bridged(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.importers import ImportOptions, import_bundle

    make_bundle(tmp_path, with_step_box=True, mesh_every=10, mesh_stride=2)
    result = import_bundle(bpy.context.scene, tmp_path, ImportOptions(point_cloud=False, video=False))
    (obj,) = result.meshes
    v = mesh_vertices(obj)
    heights = np.unique(np.round(v[:, 2], 4))
    np.testing.assert_allclose(heights, [0.0, 2.0], atol=1e-4)
    # No triangle joins the box top to the ground.
    polys = np.empty(len(obj.data.polygons) * 3, np.int32)
    obj.data.polygons.foreach_get("vertices", polys)
    z = v[polys.reshape(-1, 3), 2]
    assert np.all(np.ptp(z, axis=1) < 1e-4)


def test_existing_camera_gets_the_video(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.importers import import_bundle

    make_bundle(tmp_path, frames=(10, 12, 14))
    own = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    bpy.context.scene.collection.objects.link(own)
    result = import_bundle(bpy.context.scene, tmp_path)
    assert result.cameras[0] == own and own.users_collection[0] == bpy.context.scene.collection
    user = own.data.background_images[0].image_user
    # Sampled every 2nd frame, files named by scene frame: frame f shows file f.
    assert (user.frame_start, user.frame_offset, user.frame_duration) == (10, 9, 5)


def test_bad_bundle_is_a_clear_error(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.importers import import_bundle
    from keyframe_worlds.bridge.errors import KeyframeWorldsError

    with pytest.raises(KeyframeWorldsError, match="not found"):
        import_bundle(bpy.context.scene, tmp_path)
    make_bundle(tmp_path)
    (tmp_path / "points.ply").unlink()
    with pytest.raises(KeyframeWorldsError, match="point_cloud.path"):
        import_bundle(bpy.context.scene, tmp_path)


def test_ply_round_trip_and_errors(tmp_path):
    from keyframe_worlds.bridge.errors import KeyframeWorldsError

    rng = np.random.default_rng(0)
    v = {"x": rng.normal(size=10).astype(np.float32), "s": rng.random(10).astype(np.float32), "red": np.arange(10, dtype=np.uint8)}
    faces = np.array([[0, 1, 2], [2, 3, 4]])
    write_ply(tmp_path / "a.ply", v, faces)
    back = read_ply(tmp_path / "a.ply")
    for key in v:
        np.testing.assert_array_equal(back.vertex[key], v[key])
    np.testing.assert_array_equal(back.faces, faces)
    (tmp_path / "ascii.ply").write_text("ply\nformat ascii 1.0\nelement vertex 4\nproperty float x\nproperty float y\nproperty float z\n"
                                        "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
                                        "0 0 0\n1 0 0\n1 1 0\n0 1 0\n4 0 1 2 3\n")
    quad = read_ply(tmp_path / "ascii.ply")
    assert quad.count == 4 and quad.faces.tolist() == [[0, 1, 2], [0, 2, 3]]
    (tmp_path / "short.ply").write_bytes((tmp_path / "a.ply").read_bytes()[:-20])
    with pytest.raises(KeyframeWorldsError, match="truncated"):
        read_ply(tmp_path / "short.ply")
    (tmp_path / "no.ply").write_text("hello")
    with pytest.raises(KeyframeWorldsError, match="not a PLY"):
        read_ply(tmp_path / "no.ply")


def _backgrounds(cam) -> dict:
    return {bg.image.name: bg for bg in cam.data.background_images if bg.source == "IMAGE"}


def test_the_4d_outputs_come_in_only_when_asked(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.importers import ImportOptions, import_bundle
    from keyframe_worlds.engine.io.exr import read_exr

    make_bundle(tmp_path)
    manifest = spec.load_manifest(tmp_path)
    assert manifest.trajectories[0].frames[0].point_map and manifest.trajectories[0].frames[0].dynamic_mask
    plain = import_bundle(bpy.context.scene, tmp_path, ImportOptions())
    assert set(_backgrounds(plain.cameras[0])) == {"KFW Cam frames"}
    assert plain.point_cloud.data.materials[0].name == "shot points colour"

    result = import_bundle(bpy.context.scene, tmp_path, ImportOptions(point_maps=True, dynamic_masks=True, consistency=True))
    assert result.warnings == []
    backgrounds = _backgrounds(result.cameras[0])
    assert set(backgrounds) == {"KFW Cam frames", "KFW Cam point maps", "KFW Cam dynamic mask"}
    for name, last in (("KFW Cam point maps", 4), ("KFW Cam dynamic mask", 3)):  # the last frame has no mask
        bg = backgrounds[name]
        assert bg.image.source == "SEQUENCE" and bg.image.colorspace_settings.name == "Non-Color"
        assert not bg.show_background_image  # there to switch on, not in the way
        assert (bg.image_user.frame_start, bg.image_user.frame_duration) == (1, last)
    # Blender reads the point map's X Y Z as R G B, values as written (rows bottom-up).
    sequence = backgrounds["KFW Cam point maps"].image
    image = bpy.data.images.load(bpy.path.abspath(sequence.filepath), check_existing=False)  # its first file, as a still
    pixels = np.empty(W * H * 4, np.float32)
    image.pixels.foreach_get(pixels)
    written = read_exr(tmp_path / manifest.trajectories[0].frames[0].point_map)
    np.testing.assert_allclose(pixels.reshape(H, W, 4)[::-1, :, :3], np.stack([written[c] for c in "XYZ"], -1), atol=1e-6)
    cloud = result.point_cloud.data
    assert "consistency" in cloud.attributes
    material = cloud.materials[0]
    assert len(cloud.materials) == 1 and material.name.endswith("consistency")
    assert material.node_tree.nodes["consistency"].attribute_name == "consistency"

    again = import_bundle(bpy.context.scene, tmp_path)  # a plain re-import takes them off again
    assert set(_backgrounds(again.cameras[0])) == {"KFW Cam frames"}


def test_a_bundle_without_4d_outputs_imports_and_says_what_is_missing(blank_blend, tmp_path):
    import json

    bpy = blank_blend
    from keyframe_worlds.addon.importers import ImportOptions, import_bundle

    make_bundle(tmp_path)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    for traj in doc["trajectories"]:
        for entry in traj["files"]:
            for key in spec.FOUR_D_KEYS:
                entry.pop(key)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    cloud = read_ply(tmp_path / "points.ply")
    write_ply(tmp_path / "points.ply", {k: v for k, v in cloud.vertex.items() if k != "consistency"})  # as written before
    result = import_bundle(bpy.context.scene, tmp_path, ImportOptions(point_maps=True, dynamic_masks=True, consistency=True))
    assert set(_backgrounds(result.cameras[0])) == {"KFW Cam frames"} and len(result.point_cloud.data.points) == 500
    assert len(result.warnings) == 3
    assert any("no point maps" in w for w in result.warnings) and any("no consistency attribute" in w for w in result.warnings)


def test_scene_import_takes_the_4d_options(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon import headless

    make_bundle(tmp_path / "bundle")
    args = headless.build_parser("test").parse_args(["import", str(tmp_path / "bundle"), "--point-maps", "--dynamic-masks",
                                                     "--consistency", "--save", str(tmp_path / "out.blend")])
    assert headless.run(args) == 0
    cam = bpy.data.objects["Cam"]
    assert {"KFW Cam point maps", "KFW Cam dynamic mask"} <= set(_backgrounds(cam))
    assert bpy.data.objects["shot points"].data.materials[0].name.endswith("consistency")
    assert (tmp_path / "out.blend").is_file()
