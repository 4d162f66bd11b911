"""Reference render from the scene: the depth is z-depth in metres, exact against a known plane."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import add_camera
from PIL import Image


def test_depth_of_a_tilted_plane_is_z_depth(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.reference import render_reference
    from keyframe_worlds.addon.scene_cameras import extract_trajectory

    scene = bpy.context.scene
    bpy.ops.mesh.primitive_plane_add(size=200, location=(0, 0, 0))
    cam_data = bpy.data.cameras.new("Cam")
    cam_data.lens = 30
    cam = bpy.data.objects.new("Cam", cam_data)
    scene.collection.objects.link(cam)
    cam.location = (1.0, -2.0, 6.0)
    cam.rotation_euler = (0.5, 0.0, 0.2)  # tilted: z-depth differs from ray length across the frame
    scene.render.resolution_x, scene.render.resolution_y = 48, 32
    scene.render.engine = "BLENDER_EEVEE"
    # A camera bound to a marker would take over scene.camera when the frame is set.
    decoy = bpy.data.objects.new("Decoy", bpy.data.cameras.new("Decoy"))
    scene.collection.objects.link(decoy)
    decoy.location = (0, 0, 30)
    scene.timeline_markers.new("cut", frame=5).camera = decoy
    before = (scene.render.engine, scene.render.filepath, scene.camera)

    ref = render_reference(scene, cam, 1, tmp_path, samples=2)
    assert (scene.render.engine, scene.render.filepath, scene.camera) == before, "scene settings must be restored"
    assert scene.timeline_markers["cut"].camera == decoy
    assert Image.open(ref.image).size == (48, 32)
    depth = np.load(ref.depth)
    assert depth.shape == (32, 48) and depth.dtype == np.float32

    traj = extract_trajectory(scene, cam, [1])
    k, c2w = traj.k[0], traj.c2w_opencv[0]
    # Ray through every pixel centre, intersected with the plane z = 0, expressed as z-depth.
    u, v = np.meshgrid(np.arange(48) + 0.5, np.arange(32) + 0.5)
    rays_cam = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)
    rays_world = rays_cam @ c2w[:3, :3].T
    t = -c2w[2, 3] / rays_world[..., 2]  # along the ray, per unit of camera z
    expected = t  # rays_cam has z = 1, so the parameter is the z-depth
    assert np.all(expected > 0)
    np.testing.assert_allclose(depth, expected, rtol=2e-3)
    # And it is not the ray length (which is longer off-centre).
    ray_length = t * np.linalg.norm(rays_cam, axis=-1)
    assert np.abs(depth - ray_length).max() > 0.05


def test_background_has_zero_depth(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.reference import render_reference

    scene = bpy.context.scene
    cam = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    scene.collection.objects.link(cam)
    scene.render.resolution_x, scene.render.resolution_y = 16, 16
    ref = render_reference(scene, cam, 1, tmp_path, samples=1)
    assert np.all(np.load(ref.depth) == 0.0)


def test_reference_needs_a_perspective_camera(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.reference import render_reference
    from keyframe_worlds.bridge.errors import KeyframeWorldsError

    cam = add_camera(bpy, "Ortho", kind="ORTHO")
    with pytest.raises(KeyframeWorldsError, match="Ortho"):
        render_reference(bpy.context.scene, cam, 1, tmp_path)


def test_imported_results_are_held_out_of_the_reference(blank_blend, tmp_path):
    """A job's imported collection (here a wall right in front of the camera) is not seen by the next reference
    render or its depth, and stays visible in the scene afterwards."""
    bpy = blank_blend
    from keyframe_worlds.addon.importers import job_collection
    from keyframe_worlds.addon.reference import render_reference

    scene = bpy.context.scene
    bpy.ops.mesh.primitive_plane_add(size=200, location=(0, 0, 0))
    cam = add_camera(bpy, "Cam", location=(0.0, 0.0, 6.0))
    scene.render.resolution_x, scene.render.resolution_y = 32, 24
    clean = render_reference(scene, cam, 1, tmp_path / "clean", samples=2)
    result = job_collection(scene, "previous")
    bpy.ops.mesh.primitive_cube_add(size=2, location=(0, 0, 3))
    wall = bpy.context.active_object
    for other in list(wall.users_collection):
        other.objects.unlink(wall)
    result.objects.link(wall)
    again = render_reference(scene, cam, 1, tmp_path / "again", samples=2)
    np.testing.assert_array_equal(np.load(again.depth), np.load(clean.depth))
    np.testing.assert_array_equal(np.asarray(Image.open(again.image)), np.asarray(Image.open(clean.image)))
    layer = next(c for c in scene.view_layers[0].layer_collection.children if c.collection == result)
    assert not layer.exclude  # restored
    # without the hold-out the wall would be in the depth: the cube's top is 4 m from the camera
    layer.exclude = False
    scene.collection.children.unlink(result)
    scene.collection.objects.link(wall)
    seen = render_reference(scene, cam, 1, tmp_path / "seen", samples=2)
    assert np.load(seen.depth).min() < 4.5 < np.load(clean.depth).min()
