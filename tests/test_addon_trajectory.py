"""Trajectories from real Blender scenes (the bpy module): exact against Blender's own projection."""

from __future__ import annotations

import numpy as np
import pytest

from keyframe_worlds.bridge import cameras as conv
from keyframe_worlds.bridge import formats

from conftest import add_camera, make_trajectory

CASES = {
    "auto-landscape": dict(fit="AUTO", res=(640, 360), pct=100, shift=(0, 0), aspect=(1, 1)),
    "auto-portrait": dict(fit="AUTO", res=(360, 640), pct=100, shift=(0.1, -0.2), aspect=(1, 1)),
    "horizontal-portrait": dict(fit="HORIZONTAL", res=(300, 500), pct=50, shift=(-0.05, 0.1), aspect=(1, 1)),
    "vertical-landscape": dict(fit="VERTICAL", res=(800, 450), pct=40, shift=(0.2, 0.15), aspect=(1, 1)),
    "pixel-aspect-wide": dict(fit="AUTO", res=(720, 576), pct=100, shift=(0.1, 0.05), aspect=(2, 1)),
    "pixel-aspect-tall": dict(fit="VERTICAL", res=(500, 400), pct=80, shift=(-0.1, 0.2), aspect=(1, 1.5)),
}


def build_scene(bpy, case):
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = case["res"]
    scene.render.resolution_percentage = case["pct"]
    scene.render.pixel_aspect_x, scene.render.pixel_aspect_y = case["aspect"]
    data = bpy.data.cameras.new("Cam")
    data.sensor_fit = case["fit"]
    data.sensor_width, data.sensor_height = 36.0, 20.25
    data.shift_x, data.shift_y = case["shift"]
    cam = bpy.data.objects.new("Cam", data)
    scene.collection.objects.link(cam)
    # An animated empty that the camera is parented to, and a Track To target: the evaluated matrix must include both.
    rig = bpy.data.objects.new("Rig", None)
    scene.collection.objects.link(rig)
    cam.parent = rig
    cam.location = (0, -8, 2)
    target = bpy.data.objects.new("Target", None)
    scene.collection.objects.link(target)
    target.location = (1, 2, 0.5)
    track = cam.constraints.new("TRACK_TO")
    track.target = target
    for frame, (loc, rot, lens) in enumerate([((0, 0, 0), 0.0, 35.0), ((3, 1, 0.5), 0.6, 70.0), ((-2, 4, 1), 1.3, 24.0)], start=1):
        rig.location = loc
        rig.rotation_euler = (0, 0, rot)
        rig.keyframe_insert("location", frame=frame * 5)
        rig.keyframe_insert("rotation_euler", frame=frame * 5)
        data.lens = lens
        data.keyframe_insert("lens", frame=frame * 5)
    scene.frame_start, scene.frame_end = 1, 15
    scene.frame_set(3)
    return scene, cam


@pytest.mark.parametrize("name", list(CASES))
def test_projection_matches_blender(blank_blend, name):
    bpy = blank_blend
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    from keyframe_worlds.addon.scene_cameras import extract_trajectory, frame_range

    scene, cam = build_scene(bpy, CASES[name])
    frames = frame_range(scene, step=2)
    traj = extract_trajectory(scene, cam, frames)
    assert scene.frame_current == 3, "the current frame must be restored"
    assert traj.problems() == []
    rng = np.random.default_rng(0)
    for i, frame in enumerate(frames):
        scene.frame_set(frame)
        c2w = traj.c2w_opencv[i]
        # Points in front of the camera, spread across (and beyond) the frame.
        cam_pts = np.column_stack([rng.uniform(-3, 3, 50), rng.uniform(-3, 3, 50), rng.uniform(2, 20, 50)])
        world = cam_pts @ c2w[:3, :3].T + c2w[:3, 3]
        uv, z = conv.project_points_opencv(world, c2w, traj.k[i])
        for p, (u, v), depth in zip(world, uv, z):
            ndc = world_to_camera_view(scene, cam, Vector(p.tolist()))
            # Blender: x from the left, y from the bottom, both 0..1 over the frame; z is the depth.
            assert abs(ndc.x * traj.width - u) < 1e-5 * traj.width
            assert abs((1 - ndc.y) * traj.height - v) < 1e-5 * traj.height
            assert abs(ndc.z - depth) < 1e-4


def test_inexact_percentage_follows_the_render_not_world_to_camera_view(blank_blend):
    """At 37% of 800x450 the render is 296x166 (integer sizes, aspect changed by 0.3%).

    Blender renders with the integer size, so square pixels stay square:
    fx == fy. ``world_to_camera_view`` uses the 100% frame and would imply
    fx != fy; we follow the render, which is what the reference image shows.
    """
    bpy = blank_blend
    from keyframe_worlds.addon.scene_cameras import extract_trajectory

    scene, cam = build_scene(bpy, dict(fit="VERTICAL", res=(800, 450), pct=37, shift=(0, 0), aspect=(1, 1)))
    traj = extract_trajectory(scene, cam, [1])
    assert (traj.width, traj.height) == (296, 166)
    assert traj.fx[0] == pytest.approx(traj.fy[0], rel=1e-12)
    assert traj.fy[0] == pytest.approx(35.0 * 166 / 20.25, rel=1e-6)


def test_trajectory_file_creates_camera_that_extracts_back(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.scene_cameras import create_camera_from_trajectory, extract_trajectory

    original = make_trajectory("Imported", n=6, seed=11, width=320, height=200)
    # Blender's pixel aspect is one value per scene: give the trajectory a constant fx/fy.
    original = type(original)(**{**original.__dict__, "fy": original.fx / 1.25})
    formats.write_trajectories([original], tmp_path / "cam", "colmap")
    (read,) = formats.read_trajectories(tmp_path / "cam")
    scene = bpy.context.scene
    cam = create_camera_from_trajectory(scene, read)
    back = extract_trajectory(scene, cam, read.frames.tolist())
    # Blender stores object transforms and lens in float32.
    np.testing.assert_allclose(back.c2w_opencv, read.c2w_opencv, atol=2e-5)
    for key in ("fx", "fy", "cx", "cy"):
        np.testing.assert_allclose(getattr(back, key), getattr(read, key), rtol=1e-5, atol=1e-3)
    assert (back.width, back.height) == (320, 200)


def test_distorted_trajectory_becomes_a_pinhole_camera_that_keeps_its_lens(blank_blend):
    """The pinhole part is the Blender camera; the distortion stays on its data (tests/test_addon_lens_roundtrip.py
    has every model through every format)."""
    bpy = blank_blend
    from keyframe_worlds.addon.lens import LENS_MODEL_KEY, LENS_PARAMS_KEY
    from keyframe_worlds.addon.scene_cameras import create_camera_from_trajectory, extract_trajectory
    from keyframe_worlds.bridge.cameras import Distortion

    traj = make_trajectory("Lens", n=2, seed=3)
    traj = type(traj)(**{**traj.__dict__, "fy": traj.fx, "distortion": Distortion("OPENCV", (-0.2, 0.05, 0.001, 0.0))})
    cam = create_camera_from_trajectory(bpy.context.scene, traj)
    assert cam.data.type == "PERSP"
    assert cam.data[LENS_MODEL_KEY] == "OPENCV" and list(cam.data[LENS_PARAMS_KEY]) == [-0.2, 0.05, 0.001, 0.0]
    back = extract_trajectory(bpy.context.scene, cam, traj.frames.tolist())
    assert back.distortion == traj.distortion


def test_orthographic_camera_is_refused(blank_blend):
    bpy = blank_blend
    from keyframe_worlds.addon.scene_cameras import extract_trajectory
    from keyframe_worlds.bridge.errors import KeyframeWorldsError

    cam = add_camera(bpy, "Ortho", kind="ORTHO")
    with pytest.raises(KeyframeWorldsError, match="Ortho"):
        extract_trajectory(bpy.context.scene, cam, [1])


def test_marker_cameras_in_marker_order_with_their_shots(blank_blend):
    bpy = blank_blend
    from keyframe_worlds.addon.scene_cameras import choose_cameras, extract_trajectories

    scene = bpy.context.scene
    scene.frame_start, scene.frame_end = 1, 30
    a, b, c = (add_camera(bpy, n, (i, 0, 0)) for i, n in enumerate(("A", "B", "C")))
    scene.timeline_markers.new("m3", frame=20).camera = a  # A again, later
    scene.timeline_markers.new("m1", frame=5).camera = b
    scene.timeline_markers.new("m2", frame=12).camera = c
    scene.timeline_markers.new("plain", frame=8)  # not bound: ignored
    chosen = choose_cameras(scene, "MARKERS", range(1, 31))
    assert [cam.name for cam, _ in chosen] == ["B", "C", "A"]
    shots = {cam.name: frames for cam, frames in chosen}
    assert shots["B"] == list(range(1, 12))  # before the first marker Blender shows its camera
    assert shots["C"] == list(range(12, 20))
    assert shots["A"] == list(range(20, 31))
    trajectories = extract_trajectories(scene, "MARKERS", step=2)
    assert [t.frames.tolist() for t in trajectories] == [list(range(1, 12, 2)), list(range(13, 20, 2)), list(range(21, 31, 2))]
    # The extracted camera follows each shot's camera.
    np.testing.assert_allclose(trajectories[2].c2w_opencv[0, :3, 3], (0, 0, 0))
    np.testing.assert_allclose(trajectories[1].c2w_opencv[0, :3, 3], (2, 0, 0))


def test_camera_sources_and_errors(blank_blend):
    bpy = blank_blend
    from keyframe_worlds.addon.scene_cameras import choose_cameras
    from keyframe_worlds.bridge.errors import KeyframeWorldsError

    scene = bpy.context.scene
    with pytest.raises(KeyframeWorldsError, match="no active camera"):
        choose_cameras(scene, "SCENE", [1])
    with pytest.raises(KeyframeWorldsError, match="no timeline marker"):
        choose_cameras(scene, "MARKERS", [1])
    z, y = add_camera(bpy, "Zed", (0, 0, 0)), add_camera(bpy, "Why", (0, 0, 0))
    assert [c.name for c, _ in choose_cameras(scene, "ALL", [1])] == ["Why", "Zed"]
    assert [c.name for c, _ in choose_cameras(scene, "SELECTED", [1], selected=[z])] == ["Zed"]
    with pytest.raises(KeyframeWorldsError, match="no camera is selected"):
        choose_cameras(scene, "SELECTED", [1], selected=[])


def test_scale_is_removed_and_non_uniform_scale_warned(blank_blend):
    bpy = blank_blend
    from keyframe_worlds.addon.scene_cameras import extract_trajectory

    scene = bpy.context.scene
    cam = add_camera(bpy, "Scaled", (1, 2, 3))
    cam.rotation_euler = (0.3, 0.2, 0.1)
    plain = extract_trajectory(scene, cam, [1])
    cam.scale = (2, 2, 2)
    warnings: list[str] = []
    uniform = extract_trajectory(scene, cam, [1], warnings)
    assert warnings == []
    np.testing.assert_allclose(uniform.c2w_opencv, plain.c2w_opencv, atol=1e-6)
    cam.scale = (1, 3, 1)
    skewed = extract_trajectory(scene, cam, [1], warnings)
    assert len(warnings) == 1 and "non-uniform scale" in warnings[0] and "Scaled" in warnings[0]
    assert skewed.problems() == []


def test_drivers_and_nla_are_evaluated(blank_blend):
    """A driver on the lens and an NLA strip moving the camera: both must be in the extracted trajectory."""
    bpy = blank_blend
    from keyframe_worlds.addon.scene_cameras import extract_trajectory

    scene = bpy.context.scene
    cam = add_camera(bpy, "Driven", (0, 0, 0))
    # NLA: an action pushed down into a strip (no active action left on the object).
    for frame, x in ((1, 0.0), (11, 10.0)):
        cam.location = (x, 0, 0)
        cam.keyframe_insert("location", frame=frame)
    action = cam.animation_data.action
    track = cam.animation_data.nla_tracks.new()
    track.strips.new("move", 1, action)
    cam.animation_data.action = None
    # Driver: lens = 20 + 3 * frame.
    fcurve = cam.data.driver_add("lens")
    fcurve.driver.type = "SCRIPTED"
    fcurve.driver.use_self = False
    fcurve.driver.expression = "20 + 3 * frame"
    traj = extract_trajectory(scene, cam, [1, 6, 11])
    np.testing.assert_allclose(traj.c2w_opencv[:, 0, 3], [0.0, 5.0, 10.0], atol=1e-5)
    w = scene.render.resolution_x * scene.render.resolution_percentage // 100
    np.testing.assert_allclose(traj.fx, [(20 + 3 * f) * w / cam.data.sensor_width for f in (1, 6, 11)], rtol=1e-5)
