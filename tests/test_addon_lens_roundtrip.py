"""The add-on's trajectory import and export carry lenses, image names and COLMAP points (real bpy, real files).

Files are written with the project's own writers (``bridge.formats``) from the formats' published
descriptions, imported into Blender through the import operator's function, exported through the export
operator's function, and read back.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from keyframe_worlds.bridge import formats
from keyframe_worlds.bridge.errors import ERROR_PREFIX
from keyframe_worlds.bridge.cameras import Distortion
from keyframe_worlds.bridge.trajectory import Trajectory

from conftest import VENV_BIN, random_rotation

# Parameters with many digits, so a single-precision copy anywhere on the way would show.
LENSES = {
    "PINHOLE": (),
    "SIMPLE_PINHOLE": (),
    "SIMPLE_RADIAL": (-0.0684123456789,),
    "RADIAL": (-0.0812345678901, 0.0123456789012),
    "OPENCV": (-0.241234567891, 0.0712345678901, 0.00123456789012, -0.00171234567891),
    "FULL_OPENCV": (-0.231234567891, 0.0612345678901, 0.00113456789012, -0.00091234567891, 0.0051234567891,
                    0.0123456789012, -0.00312345678901, 0.00071234567891),
    "OPENCV_FISHEYE": (0.0312345678901, -0.0112345678901, 0.00212345678901, -0.000412345678901),
    "SIMPLE_RADIAL_FISHEYE": (0.0212345678901,),
    "RADIAL_FISHEYE": (0.0412345678901, -0.00712345678901),
}
# nerfstudio's OPENCV has no rational terms: FULL_OPENCV goes there only with k4 = k5 = k6 = 0.
NERFSTUDIO_LENSES = {**LENSES, "FULL_OPENCV": LENSES["FULL_OPENCV"][:5] + (0.0, 0.0, 0.0)}
FRAMES = [2, 4, 6, 8]


def plate(model: str, params: tuple, name: str = "Plate", width: int = 160, height: int = 120) -> Trajectory:
    """Four frames of a camera with lens ``model``, its images named as a photogrammetry tool would."""
    rng = np.random.default_rng(len(model))
    n = len(FRAMES)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        c2w[i, :3, :3] = random_rotation(rng)
        c2w[i, :3, 3] = rng.uniform(-5, 5, 3)
    fx = rng.uniform(100, 200, n)
    return Trajectory(name=name, frames=FRAMES, c2w_opencv=c2w, fx=fx, fy=fx, cx=rng.uniform(70, 90, n),
                      cy=rng.uniform(50, 70, n), width=width, height=height, fps=24.0,
                      distortion=Distortion(model, params), images=[f"DSC_{1000 + 7 * i:05d}.JPG" for i in range(n)])


def import_export_read(bpy, source, fmt: str, out):
    """Import ``source`` (format ``fmt``) into the empty scene, export its cameras as ``fmt`` to ``out``, read that back."""
    from keyframe_worlds.addon.scene_cameras import export_trajectories, import_trajectory_file

    scene = bpy.context.scene
    result = import_trajectory_file(scene, str(source), fmt)
    assert result.warnings == []
    scene.frame_start, scene.frame_end = FRAMES[0], FRAMES[-1]
    _, written = export_trajectories(scene, "ALL", str(out), fmt, step=FRAMES[1] - FRAMES[0])
    assert written
    return result, formats.read_trajectories(out, fmt)


def assert_same_cameras(back: list[Trajectory], read: list[Trajectory]) -> None:
    assert [t.name for t in back] == [t.name for t in read]
    for b, r in zip(back, read):
        np.testing.assert_array_equal(b.frames, r.frames)
        assert b.images == r.images
        # Exactly: the lens travels as double-precision custom properties.
        assert b.distortion == r.distortion
        # Blender keeps transforms and focal length in float32.
        np.testing.assert_allclose(b.c2w_opencv, r.c2w_opencv, atol=2e-5)
        for key in ("fx", "fy", "cx", "cy"):
            np.testing.assert_allclose(getattr(b, key), getattr(r, key), rtol=1e-6, atol=1e-4)
        assert (b.width, b.height) == (r.width, r.height)


@pytest.mark.parametrize("model", list(LENSES))
@pytest.mark.parametrize("fmt", ["colmap", "colmap-binary"])
def test_colmap_lens_and_names_survive_import_then_export(blank_blend, tmp_path, model, fmt):
    bpy = blank_blend
    original = plate(model, LENSES[model])
    formats.write_trajectories([original], tmp_path / "sparse", fmt)
    read = formats.read_trajectories(tmp_path / "sparse", fmt)
    assert read[0].allclose(original, atol=1e-12), "the writers and readers themselves are lossless"
    result, back = import_export_read(bpy, tmp_path / "sparse", fmt, tmp_path / "exported")
    (cam,) = result.cameras
    assert cam.data.type == "PERSP"
    assert_same_cameras(back, read)
    if model != "PINHOLE":
        assert back[0].distortion[0] == Distortion(model, LENSES[model])


@pytest.mark.parametrize("model", list(NERFSTUDIO_LENSES))
def test_nerfstudio_lens_and_file_paths_survive_import_then_export(blank_blend, tmp_path, model):
    bpy = blank_blend
    original = plate(model, NERFSTUDIO_LENSES[model])
    original = Trajectory(**{**original.__dict__, "images": [f"images/frame_{i:05d}.png" for i in range(1, 5)]})
    formats.write_trajectories([original], tmp_path / "transforms.json", "nerfstudio")
    read = formats.read_trajectories(tmp_path / "transforms.json", "nerfstudio")
    result, back = import_export_read(bpy, tmp_path / "transforms.json", "nerfstudio", tmp_path / "out" / "transforms.json")
    assert_same_cameras(back, read)
    assert back[0].images == tuple(original.images)


def test_a_lens_that_changes_over_the_shot_survives(blank_blend, tmp_path):
    """Per-frame lenses (a zoom that changes the distortion, a pinhole frame among them) through our own format."""
    bpy = blank_blend
    from keyframe_worlds.addon.lens import LENS_FRAMES_KEY
    from keyframe_worlds.addon.scene_cameras import extract_trajectory

    base = plate("OPENCV", LENSES["OPENCV"])
    lenses = [Distortion("OPENCV", (-0.2, 0.05, 0.0, 0.001)), None, Distortion("OPENCV", (-0.3, 0.07, 0.0, 0.001)),
              Distortion("OPENCV", (-0.3, 0.07, 0.0, 0.001))]
    zoom = Trajectory(**{**base.__dict__, "distortion": lenses, "images": [None, "a.png", None, "b.png"]})
    formats.write_trajectories([zoom], tmp_path / "zoom.json", "keyframe-worlds")
    read = formats.read_trajectories(tmp_path / "zoom.json")
    result, back = import_export_read(bpy, tmp_path / "zoom.json", "keyframe-worlds", tmp_path / "back.json")
    assert_same_cameras(back, read)
    assert set(result.cameras[0].data[LENS_FRAMES_KEY].keys()) == {"2", "4", "6"}, "only where the lens changes"
    # Between keyed frames a lens holds, as a constant key would.
    between = extract_trajectory(bpy.context.scene, result.cameras[0], [3, 5, 7])
    assert between.distortion == (lenses[0], None, lenses[2])
    assert between.images == (None, None, None)


def test_a_camera_made_in_blender_exports_as_a_pinhole_without_names(blank_blend, tmp_path):
    bpy = blank_blend
    from conftest import add_camera

    from keyframe_worlds.addon.scene_cameras import export_trajectories

    scene = bpy.context.scene
    scene.camera = add_camera(bpy, "Cam", (1, 2, 3))
    scene.frame_start, scene.frame_end = 1, 3
    (traj,), _ = export_trajectories(scene, "SCENE", str(tmp_path / "c.json"), "keyframe-worlds")
    assert traj.distortion == (None,) * 3 and traj.images == (None,) * 3


def test_an_edited_lens_property_that_is_no_lens_is_named(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.lens import LENS_PARAMS_KEY
    from keyframe_worlds.addon.scene_cameras import export_trajectories, import_trajectory_file
    from keyframe_worlds.bridge.errors import KeyframeWorldsError

    formats.write_trajectories([plate("RADIAL", LENSES["RADIAL"])], tmp_path / "sparse", "colmap")
    scene = bpy.context.scene
    (cam,) = import_trajectory_file(scene, str(tmp_path / "sparse")).cameras
    cam.data[LENS_PARAMS_KEY] = [0.1]
    scene.frame_start, scene.frame_end = 2, 8
    with pytest.raises(KeyframeWorldsError, match=r"camera 'Plate': custom properties kfw_lens_model/kfw_lens_params: "
                                                  r"camera model RADIAL has 2 distortion parameter\(s\) \(k1, k2\), got 1"):
        export_trajectories(scene, "ALL", str(tmp_path / "out.json"), "keyframe-worlds")


def test_a_lens_the_target_format_cannot_hold_is_refused_by_name(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.scene_cameras import export_trajectories, import_trajectory_file
    from keyframe_worlds.bridge.errors import KeyframeWorldsError

    formats.write_trajectories([plate("OPENCV", LENSES["OPENCV"])], tmp_path / "sparse", "colmap")
    scene = bpy.context.scene
    import_trajectory_file(scene, str(tmp_path / "sparse"))
    scene.frame_start, scene.frame_end = 2, 8
    with pytest.raises(KeyframeWorldsError, match="camera 'Plate' frame 2: camera model OPENCV cannot be written as worldstereo"):
        export_trajectories(scene, "ALL", str(tmp_path / "camera.json"), "worldstereo", step=2)


def sparse_model(tmp_path, fmt: str = "colmap"):
    """A pinhole COLMAP model whose points3D lie in front of its cameras, with colours."""
    from keyframe_worlds.bridge.sparse import SparsePoints

    traj = plate("PINHOLE", ())
    rng = np.random.default_rng(5)
    # Points 3-8 m in front of the first camera, spread over its view.
    cam_pts = np.column_stack([rng.uniform(-1, 1, 200), rng.uniform(-0.8, 0.8, 200), np.ones(200)]) * rng.uniform(3, 8, (200, 1))
    xyz = cam_pts @ traj.c2w_opencv[0, :3, :3].T + traj.c2w_opencv[0, :3, 3]
    points = SparsePoints.from_xyz(xyz, rng.integers(0, 256, (200, 3)).astype(np.uint8))
    formats.write_trajectory_set(formats.TrajectorySet((traj,), points), tmp_path / "sparse", fmt)
    return traj, points


@pytest.mark.parametrize("fmt", ["colmap", "colmap-binary"])
def test_points3d_come_in_as_a_point_cloud_in_the_cameras_world(blank_blend, tmp_path, fmt):
    bpy = blank_blend
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    from keyframe_worlds.addon.scene_cameras import import_trajectory_file
    from keyframe_worlds.bridge import cameras as conv

    traj, points = sparse_model(tmp_path, fmt)
    scene = bpy.context.scene
    assert import_trajectory_file(scene, str(tmp_path / "sparse"), fmt).point_cloud is None, "off by default"
    bpy.ops.wm.read_homefile(app_template="", use_empty=True)
    scene = bpy.context.scene
    result = import_trajectory_file(scene, str(tmp_path / "sparse"), fmt, points=True)
    cloud = result.point_cloud
    assert cloud.type == "POINTCLOUD" and cloud.name == "sparse points3D"
    assert np.array_equal(np.array(cloud.matrix_world), np.eye(4))
    positions = np.empty(len(cloud.data.points) * 3, np.float32)
    cloud.data.attributes["position"].data.foreach_get("vector", positions)
    np.testing.assert_array_equal(positions.reshape(-1, 3), points.xyz.astype(np.float32))
    colours = np.empty(len(cloud.data.points) * 4, np.float32)
    cloud.data.attributes["color"].data.foreach_get("color_srgb", colours)
    np.testing.assert_allclose(colours.reshape(-1, 4)[:, :3] * 255, points.rgb, atol=0.51)
    # The same world: Blender's own projection through the imported camera puts each point where COLMAP's does.
    scene.frame_set(FRAMES[0])
    (cam,) = result.cameras
    uv, _ = conv.project_points_opencv(points.xyz, traj.c2w_opencv[0], traj.k[0])
    for p, (u, v) in zip(points.xyz[:20], uv[:20]):
        ndc = world_to_camera_view(scene, cam, Vector(p.tolist()))
        assert abs(ndc.x * traj.width - u) < 1e-3 and abs((1 - ndc.y) * traj.height - v) < 1e-3


def test_points_from_a_format_without_points_is_a_warning(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.scene_cameras import import_trajectory_file

    formats.write_trajectories([plate("OPENCV", LENSES["OPENCV"])], tmp_path / "t.json", "nerfstudio")
    result = import_trajectory_file(bpy.context.scene, str(tmp_path / "t.json"), points=True)
    assert result.point_cloud is None and len(result.cameras) == 1
    assert result.warnings == ["nerfstudio files hold no points (only colmap, colmap-binary do): no point cloud imported"]


def test_the_active_clip_gets_the_lens_on_request(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.scene_cameras import import_trajectory_file

    image = bpy.data.images.new("plate", 160, 120)
    image.filepath_raw = str(tmp_path / "plate.png")
    image.file_format = "PNG"
    image.save()
    clip = bpy.data.movieclips.load(str(tmp_path / "plate.png"))
    scene = bpy.context.scene
    scene.active_clip = clip
    traj = plate("OPENCV", LENSES["OPENCV"])
    traj = Trajectory(**{**traj.__dict__, "fx": traj.fx[0], "fy": traj.fx[0]})  # one focal length: a clip has one
    formats.write_trajectories([traj], tmp_path / "sparse", "colmap")
    import_trajectory_file(scene, str(tmp_path / "sparse"))
    assert clip.tracking.camera.distortion_model == "POLYNOMIAL" and clip.tracking.camera.k1 == 0, "not without asking"
    result = import_trajectory_file(scene, str(tmp_path / "sparse"), clip_lens=True)
    assert result.warnings == []
    tracking = clip.tracking.camera
    k1, k2, p1, p2 = LENSES["OPENCV"]
    assert tracking.distortion_model == "BROWN"
    # libmv's p1, p2 are OpenCV's p2, -p1 (swapped, and y up); Blender keeps them in float32.
    np.testing.assert_allclose([tracking.brown_k1, tracking.brown_k2, tracking.brown_p1, tracking.brown_p2], [k1, k2, p2, -p1], rtol=1e-6)
    np.testing.assert_allclose(tracking.focal_length_pixels, traj.fx[0], rtol=1e-6)


def test_headless_import_trajectory_with_points(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.lens import IMAGES_KEY, LENS_MODEL_KEY

    traj, points = sparse_model(tmp_path)
    blend = tmp_path / "shot.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    cli = [str(VENV_BIN / "keyframe-worlds"), "scene", "--blend", str(blend), "import-trajectory"]
    out = subprocess.run(cli + [str(tmp_path / "sparse"), "--points", "--save", str(tmp_path / "with_points.blend")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "imported 1 camera(s): Plate, 200 points as 'sparse points3D'" in out.stdout
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "with_points.blend"))
    assert len(bpy.data.objects["sparse points3D"].data.points) == len(points)
    data = bpy.data.objects["Plate"].data
    assert LENS_MODEL_KEY not in data, "a PINHOLE keeps no lens"
    assert dict(data[IMAGES_KEY]) == {str(f): name for f, name in zip(traj.frames, traj.images)}
    bad = subprocess.run(cli + [str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"{ERROR_PREFIX} trajectory file not found")


def test_the_operators_import_and_export_lens_names_and_points(blank_blend, tmp_path):
    """The file-browser operators themselves (registered add-on): import with Points ticked, export as COLMAP."""
    bpy = blank_blend
    import keyframe_worlds

    traj = plate("FULL_OPENCV", LENSES["FULL_OPENCV"])
    _, points = sparse_model(tmp_path / "pinhole")
    formats.write_trajectory_set(formats.TrajectorySet((traj,), points), tmp_path / "sparse", "colmap-binary")
    keyframe_worlds.register()
    try:
        assert bpy.ops.keyframe_worlds.import_trajectory(filepath=str(tmp_path / "sparse" / "cameras.bin"), points=True) == {"FINISHED"}
        assert len(bpy.data.objects["sparse points3D"].data.points) == len(points)
        scene = bpy.context.scene
        scene.frame_start, scene.frame_end = FRAMES[0], FRAMES[-1]
        assert bpy.ops.keyframe_worlds.export_trajectory(filepath=str(tmp_path / "out.json"), format="colmap", cameras="ALL",
                                                         frame_step=2) == {"FINISHED"}
    finally:
        keyframe_worlds.unregister()
    (back,) = formats.read_trajectories(tmp_path / "out", "colmap")
    assert back.distortion == (Distortion("FULL_OPENCV", LENSES["FULL_OPENCV"]),) * len(FRAMES)
    assert back.images == traj.images
