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


def _emission_box(bpy, name, location, size, colour):
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=location)
    box = bpy.context.active_object
    box.name = name
    box.scale = size
    material = bpy.data.materials.new(name)
    if material.node_tree is None:  # Blender before 5
        material.use_nodes = True
    nodes = material.node_tree.nodes
    nodes.clear()
    emission = nodes.new("ShaderNodeEmission")
    emission.inputs["Color"].default_value = (*colour, 1.0)
    output = nodes.new("ShaderNodeOutputMaterial")
    material.node_tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])
    box.data.materials.append(material)
    return box


def test_a_camera_with_a_lens_renders_its_reference_through_that_lens(blank_blend, tmp_path):
    """A Blender camera renders pinhole views; the job says its camera has a lens. The reference is rendered through
    the pinhole keeping the lens's field of view and distorted into the lens, so that the engine, undistorting it
    as it undistorts a plate, gets what a pinhole render at that pinhole shows. Rendering the camera as it is (the
    pinhole at the plate's own focal length, what the add-on did before) and declaring its lens is visibly off."""
    bpy = blank_blend
    from keyframe_worlds.addon.jobs import JobSettings, prepare_job
    from keyframe_worlds.addon.reference import render_reference
    from keyframe_worlds.bridge.cameras import Distortion
    from keyframe_worlds.bridge.spec import load_job
    from keyframe_worlds.engine.run.lens import pinhole_job
    from keyframe_worlds.engine.run.runner import load_reference

    scene = bpy.context.scene
    w, h = 96, 72
    scene.render.resolution_x, scene.render.resolution_y = w, h
    scene.frame_start = scene.frame_end = 1
    _emission_box(bpy, "floor", (0, 0, -0.05), (20, 20, 0.1), (0.55, 0.5, 0.4))
    for i, (x, y, colour) in enumerate([(-1.5, 2.0, (0.9, 0.1, 0.1)), (1.2, 1.0, (0.1, 0.8, 0.2)), (0.0, 4.0, (0.1, 0.2, 0.9)),
                                        (-2.8, 0.5, (0.9, 0.8, 0.1)), (2.6, 3.2, (0.8, 0.2, 0.9))]):
        _emission_box(bpy, f"box{i}", (x, y, 0.5), (0.8, 0.8, 1.0 + 0.3 * i), colour)
    cam = bpy.data.objects.new("Plate", bpy.data.cameras.new("Plate"))
    scene.collection.objects.link(cam)
    cam.data.lens = 24.0
    cam.location = (0.2, -4.0, 1.4)
    cam.rotation_euler = (1.35, 0.0, 0.05)
    scene.camera = cam
    lens = Distortion("OPENCV", (-0.28, 0.08, 0.004, -0.003))
    cam.data["kfw_lens_model"] = lens.model
    cam.data["kfw_lens_params"] = list(lens.params)

    prepared = prepare_job(scene, JobSettings(name="lens", samples=4), tmp_path / "job")
    job = pinhole_job(load_job(prepared.spec_path))
    assert job.spec.trajectories[0].intrinsics(0).fx < prepared.spec.trajectories[0].intrinsics(0).fx  # barrel: wider

    def as_the_engine_sees(image_path, depth_path):
        from PIL import Image as PILImage

        rgb = np.asarray(PILImage.open(image_path).convert("RGB"))
        return job.undistort_reference(rgb, np.load(depth_path))

    _traj, _i, rgb, depth = load_reference(job.spec)
    seen_rgb, seen_depth, valid = job.undistort_reference(rgb, depth)
    # The truth: a pinhole render at the engine's pinhole (the camera's intrinsics set to it).
    from keyframe_worlds.bridge.cameras import blender_lens_and_shift

    pinhole = job.spec.trajectories[0].intrinsics(0)
    truth_cam = bpy.data.objects.new("Truth", bpy.data.cameras.new("Truth"))
    scene.collection.objects.link(truth_cam)
    truth_cam.matrix_world = cam.matrix_world.copy()
    truth_cam.data.sensor_fit = "HORIZONTAL"
    truth_cam.data.lens, truth_cam.data.shift_x, truth_cam.data.shift_y = blender_lens_and_shift(
        pinhole.fx, pinhole.cx, pinhole.cy, w, h, truth_cam.data.sensor_width)
    truth = render_reference(scene, truth_cam, 1, tmp_path / "truth", samples=4)
    truth_rgb = np.asarray(Image.open(truth.image).convert("RGB")).astype(np.float64)
    truth_depth = np.load(truth.depth)
    inner = valid.copy()
    inner[:3], inner[-3:], inner[:, :3], inner[:, -3:] = False, False, False, False
    error = float(np.abs(seen_rgb.astype(np.float64) - truth_rgb)[inner].mean())
    assert error < 4.0, error  # 1.1 (the resampling)
    surface = inner & (truth_depth > 0) & (seen_depth > 0)
    assert surface.mean() > 0.5
    assert np.median(np.abs(seen_depth - truth_depth)[surface] / truth_depth[surface]) < 0.005
    # The camera rendered as it is, its lens declared all the same: the engine's pinhole view bends.
    plain = render_reference(scene, cam, 1, tmp_path / "plain", samples=4)
    bent_rgb, _bent_depth, _ = as_the_engine_sees(plain.image, plain.depth)
    assert float(np.abs(bent_rgb.astype(np.float64) - truth_rgb)[inner].mean()) > 2 * error  # 5.3
    assert "Plate pinhole stand-in" not in bpy.data.objects and scene.camera == cam  # the stand-in is gone
