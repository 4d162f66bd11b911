"""``reference.points``: a PLY or a COLMAP model seeds the memory, so a scanned location is the world a job continues.

The scene is the synthetic one (``engine/testing/synthetic.py``), ray-cast and lifted to a PLY here; jobs run the
real ``preview`` generator; the service test submits through a real engine subprocess.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from keyframe_worlds.bridge import formats, ply
from keyframe_worlds.bridge.cameras import unproject_depth_grid
from keyframe_worlds.bridge.client import EngineError
from keyframe_worlds.bridge.formats import TrajectorySet
from keyframe_worlds.bridge.jobs import Progress
from keyframe_worlds.bridge.seed import read_seed_points, write_seed_ply
from keyframe_worlds.bridge.sparse import SparsePoints
from keyframe_worlds.bridge.spec import MAX_SEED_POINTS, load_job, validate_job
from keyframe_worlds.bridge.trajectory import Trajectory
from keyframe_worlds.engine.io.images import read_rgb, write_png
from keyframe_worlds.engine.run.runner import run_job
from keyframe_worlds.engine.run.seed import SEED_CONFIDENCE, seed_memory
from keyframe_worlds.engine.testing.service import Engine
from keyframe_worlds.engine.testing.synthetic import demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast
from keyframe_worlds.engine.world.memory import PointMemory

W, H = 96, 72
K = intrinsics_for_fov(W, H, 70.0)
REFERENCE = ((-0.4, -4.0, 1.6), (0.0, 2.0, 0.8))
NEW_VIEW = ((2.0, -3.0, 2.2), (-1.5, 2.0, 0.4))  # another place, looking another way
SCAN_VIEWS = (REFERENCE, NEW_VIEW, ((-3.0, -3.5, 1.8), (1.0, 3.0, 0.6)), ((0.5, -1.5, 2.5), (0.0, 4.0, 0.0)))


def k_matrix(k: torch.Tensor) -> np.ndarray:
    fx, fy, cx, cy = k.tolist()
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])


@functools.cache
def scan_of_the_scene() -> tuple[np.ndarray, np.ndarray]:
    """The synthetic scene as a scanner would give it: (N, 3) world points and (N, 3) uint8 colours, from 4 views."""
    xyz, rgb = [], []
    for eye, target in SCAN_VIEWS:
        c2w = look_at_c2w_opencv(eye, target)
        colour, depth = raycast(demo_scene(), c2w, K, W, H)
        points, _uv = unproject_depth_grid(depth.numpy(), c2w.numpy(), k_matrix(K), stride=1)
        keep = np.isfinite(points).all(-1)
        xyz.append(points[keep])
        rgb.append(colour.numpy()[keep])
    return np.concatenate(xyz).astype(np.float32), np.concatenate(rgb)


@functools.cache
def reference_view() -> np.ndarray:
    return raycast(demo_scene(), look_at_c2w_opencv(*REFERENCE), K, W, H)[0].numpy()


def write_seeded_job(folder, points: str | None = "scan.ply", scan: bool = True) -> tuple:
    """A two-frame job (the reference camera, then a new one) seeded with ``points``; ``scan``: write scan.ply, the
    synthetic scene's scan (else a 3-point PLY)."""
    xyz, rgb = scan_of_the_scene() if scan else (np.eye(3, dtype=np.float32), np.full((3, 3), 200, np.uint8))
    write_seed_ply(folder / "scan.ply", xyz, rgb)
    write_png(folder / "ref.png", reference_view())
    fx, fy, cx, cy = K.tolist()
    frames = [{"frame": i + 1, "c2w_opencv": look_at_c2w_opencv(*view).tolist(), "fx": fx, "fy": fy, "cx": cx, "cy": cy}
              for i, view in enumerate((REFERENCE, NEW_VIEW))]
    job = {"version": 1, "name": "seeded", "generator": "preview",
           "reference": {"image": "ref.png", **({"points": points} if points else {})},
           "trajectories": [{"name": "Cam", "fps": 24.0, "width": W, "height": H, "frames": frames}],
           "output": {"mesh_every": 8, "mesh_stride": 8},
           "geometry": {"flow": "none", "point_maps": False},
           "options": {"segment_length": 2}}
    (folder / "job.json").write_text(json.dumps(job))
    return folder / "job.json", xyz, rgb


def mean_abs(a, b, where) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))[where].mean())


class Log(Progress):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_a_job_seeded_from_a_ply_renders_that_scene_from_a_new_camera(tmp_path):
    path, xyz, rgb = write_seeded_job(tmp_path)
    log = Log()
    manifest = run_job(load_job(path), tmp_path / "out", log)
    assert any(line.startswith(f"memory seeded with {len(xyz)} of {len(xyz)} points of PLY ") for line in log.lines), log.lines
    assert any(line.startswith("reference depth: the seed's points at the reference camera") for line in log.lines)
    assert manifest.warnings == ()  # the seed gave the reference its depth: no flat board
    new_frame = read_rgb(tmp_path / "out" / manifest.trajectories[0].frames[1].image)

    # A render of the PLY alone at the new camera.
    scan = PointMemory(max_points=None)
    seed_memory(scan, read_seed_points(tmp_path / "scan.ply"))
    c2w = look_at_c2w_opencv(*NEW_VIEW)
    render = scan.render(c2w[None], K[None], W, H)
    covered = render.mask[0].numpy()
    assert covered.mean() > 0.8  # the top rows see the sky beyond the walls
    # Where the scan covers the new view, the frame is the scan's render: the reference (lifted at the scan's own
    # depth) only added what the scan did not explain, so nothing in front of it.
    assert mean_abs(new_frame, render.rgb[0].numpy(), covered) < 1.0
    truth, _z = raycast(demo_scene(), c2w, K, W, H)
    seeded_error = mean_abs(new_frame, truth.numpy(), covered)
    assert seeded_error < mean_abs(render.rgb[0].numpy(), truth.numpy(), covered) + 1.0  # the splats' own error

    # Without the seed the same job knows only the reference (a flat board): the new view is far from the scene.
    (tmp_path / "plain").mkdir()
    plain_path, *_ = write_seeded_job(tmp_path / "plain", points=None)
    plain = run_job(load_job(plain_path), tmp_path / "plain" / "out")
    plain_frame = read_rgb(tmp_path / "plain" / "out" / plain.trajectories[0].frames[1].image)
    assert mean_abs(plain_frame, truth.numpy(), covered) > 2 * seeded_error
    # The bundle's fused cloud holds the seed.
    assert ply.read_ply(tmp_path / "out" / "points.ply").count >= len(xyz)


def test_a_colmap_model_seeds_the_memory_with_its_points3d(tmp_path):
    rng = np.random.default_rng(3)
    xyz = rng.uniform(-2, 2, (500, 3))
    rgb = rng.integers(0, 256, (500, 3)).astype(np.uint8)
    cam = Trajectory("Cam", [1], np.eye(4)[None], 50.0, 50.0, 32.0, 24.0, 64, 48)
    formats.write_trajectory_set(TrajectorySet((cam,), SparsePoints.from_xyz(xyz, rgb)), tmp_path / "sparse", "colmap-binary")
    seed = read_seed_points(tmp_path / "sparse")
    np.testing.assert_allclose(seed.positions_world, xyz.astype(np.float32))
    assert np.array_equal(seed.colors, rgb) and "COLMAP points3D" in seed.source
    memory = PointMemory(max_points=300)  # the budget holds: voxel downsampling
    assert seed_memory(memory, seed) <= 300 and bool((memory.confidence == SEED_CONFIDENCE).all())
    assert bool((memory.frame_index == 0).all())


def test_reference_points_are_checked_with_field_paths_and_limits(tmp_path):
    path, *_ = write_seeded_job(tmp_path, scan=False)
    doc = json.loads(path.read_text())

    def problems(points):
        doc["reference"]["points"] = points
        return [str(p) for p in validate_job(doc, base_dir=tmp_path)]

    assert problems("scan.ply") == []
    assert problems("nothing.ply") == [f"reference.points: not found: {tmp_path / 'nothing.ply'}"]
    assert problems("ref.png") == ["reference.points: must be a .ply file or a COLMAP model folder, got 'ref.png'"]
    (tmp_path / "empty").mkdir()
    assert problems("empty") == [f"reference.points: {tmp_path / 'empty'} is a folder without a COLMAP model's points3D "
                                 "(points3D.txt or points3D.bin, beside cameras and images)"]
    (tmp_path / "huge.ply").write_bytes(f"ply\nformat binary_little_endian 1.0\nelement vertex {MAX_SEED_POINTS + 1}\n"
                                        "property float x\nproperty float y\nproperty float z\nend_header\n".encode())
    assert problems("huge.ply") == [f"reference.points: {tmp_path / 'huge.ply'} has {MAX_SEED_POINTS + 1} points, more than "
                                    f"the limit of {MAX_SEED_POINTS}"]
    data = (tmp_path / "scan.ply").read_bytes()
    (tmp_path / "cut.ply").write_bytes(data[:-5])
    assert problems("cut.ply") == [f"reference.points: {tmp_path / 'cut.ply'}: the header declares 45 bytes of data but the "
                                   "file holds 40 (truncated)"]
    (tmp_path / "big").mkdir()
    for name in ("cameras.bin", "images.bin"):
        (tmp_path / "big" / name).write_bytes(bytes(8))
    (tmp_path / "big" / "points3D.bin").write_bytes((MAX_SEED_POINTS + 1).to_bytes(8, "little"))
    assert problems("big") == [f"reference.points: {tmp_path / 'big' / 'points3D.bin'} has {MAX_SEED_POINTS + 1} points, "
                               f"more than the limit of {MAX_SEED_POINTS}"]
    (tmp_path / "text.ply").write_text("not a ply")
    assert problems("text.ply") == [f"reference.points: {tmp_path / 'text.ply'} is not a PLY file (no 'ply' magic or no end_header)"]
    assert problems(3) == ["reference.points: must be a string, got int"]


def test_the_service_takes_the_seed_as_an_upload_and_a_colmap_folder_as_its_ply(tmp_path):
    path, xyz, rgb = write_seeded_job(tmp_path)
    cam = Trajectory("Scan", [1], np.eye(4)[None], 50.0, 50.0, 32.0, 24.0, 64, 48)
    formats.write_trajectory_set(TrajectorySet((cam,), SparsePoints.from_xyz(xyz[::7], rgb[::7])), tmp_path / "sparse", "colmap")
    doc = json.loads(path.read_text())
    doc["reference"]["points"] = "sparse"
    (tmp_path / "job").mkdir()
    for name in ("sparse", "ref.png"):
        (tmp_path / name).rename(tmp_path / "job" / name)
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu", "--allow-path", str(tmp_path / "job"))) as engine:
        client = engine.start()
        # Uploaded (multipart), and as a local path the engine reads (a loopback client, inside --allow-path).
        jobs = [client.submit(doc, base_dir=tmp_path / "job"), client.submit(doc, base_dir=tmp_path / "job", upload=False)]
        for job in jobs:
            status = client.wait(job.id, timeout=120)
            assert status.state == "completed", status
            uploaded = tmp_path / "jobs" / job.id / "inputs" / "reference_points.ply"
            assert ply.read_ply(uploaded).count == len(xyz[::7])
            spec = json.loads((tmp_path / "jobs" / job.id / "spec.json").read_text())
            assert spec["reference"]["points"] == "inputs/reference_points.ply"
            assert f"memory seeded with {len(xyz[::7])} of {len(xyz[::7])} points" in client.log(job.id)
        # A seed outside the allowed folders is refused by name, like the other reference files.
        outside = {**doc, "reference": {**doc["reference"], "image": str(tmp_path / "job" / "ref.png"),
                                        "points": str(tmp_path / "scan.ply")}}
        with pytest.raises(EngineError) as refused:
            client.submit(outside, upload=False)
        assert "reference.points" in str(refused.value) and "outside" in str(refused.value)


# --- Blender: a mesh or point-cloud object as the seed ------------------------------------------------------------


def test_a_blender_mesh_seeds_a_job_with_its_evaluated_world_points_and_colours(blank_blend, tmp_path):
    bpy = blank_blend
    import keyframe_worlds
    from keyframe_worlds.addon.jobs import JobSettings, prepare_job

    mesh = bpy.data.meshes.new("scan")
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    mesh.from_pydata(verts.tolist(), [], [(0, 1, 2), (0, 1, 3)])
    colours = mesh.color_attributes.new("Col", "BYTE_COLOR", "POINT")
    srgb = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 128], [77, 77, 77]], np.uint8)
    colours.data.foreach_set("color_srgb", np.column_stack([srgb / 255.0, np.ones(4)]).astype(np.float32).ravel())
    obj = bpy.data.objects.new("scan", mesh)
    bpy.context.scene.collection.objects.link(obj)
    obj.location, obj.rotation_euler, obj.scale = (2.0, -1.0, 0.5), (0.0, 0.0, np.pi / 2), (2.0, 2.0, 2.0)
    mirror = obj.modifiers.new("mirror", "MIRROR")  # evaluated: the mirrored copy is part of the seed
    mirror.use_axis = (True, False, False)
    mirror.use_mirror_merge = False
    camera = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    bpy.context.scene.collection.objects.link(camera)
    camera.location = (0.0, -6.0, 1.0)
    camera.rotation_euler = (np.pi / 2, 0.0, 0.0)
    bpy.context.scene.camera = camera
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = 64, 48
    scene.frame_start, scene.frame_end = 1, 2
    write_png(tmp_path / "ref.png", np.full((48, 64, 3), 90, np.uint8))

    # The operator puts the active object in the panel's Memory Seed; a camera is refused.
    keyframe_worlds.register()
    try:
        bpy.context.view_layer.objects.active = camera
        with pytest.raises(RuntimeError, match=r"select a mesh or point cloud to seed the memory with \('Cam' is a camera\)"):
            bpy.ops.keyframe_worlds.use_seed_object()
        bpy.context.view_layer.objects.active = obj
        assert bpy.ops.keyframe_worlds.use_seed_object() == {"FINISHED"}
        settings = scene.keyframe_worlds.to_settings(scene)
    finally:
        keyframe_worlds.unregister()
    assert settings.seed_object == "scan"
    settings = JobSettings(**{**settings.__dict__, "reference": "FILE", "reference_path": str(tmp_path / "ref.png"),
                              "depth": "NONE"})
    job = prepare_job(scene, settings, tmp_path / "job")
    assert json.loads((tmp_path / "job" / "job.json").read_text())["reference"]["points"] == "seed_points.ply"
    seed = read_seed_points(job.spec.reference.points)
    matrix = np.array(obj.matrix_world)
    mirrored = np.concatenate([verts, verts * [-1, 1, 1]])
    expected = mirrored @ matrix[:3, :3].T + matrix[:3, 3]
    assert len(seed.positions_world) == 8
    order = np.lexsort(seed.positions_world.T), np.lexsort(expected.T)
    np.testing.assert_allclose(seed.positions_world[order[0]], expected[order[1]], atol=1e-5)
    np.testing.assert_array_equal(seed.colors[order[0]], np.concatenate([srgb, srgb])[order[1]])
    # The job runs seeded with it.
    log = Log()
    run_job(job.spec, tmp_path / "job" / "out", log)
    assert any(line.startswith("memory seeded with 8 of 8 points") for line in log.lines)


def test_a_previous_bundles_point_cloud_in_blender_seeds_with_the_same_points(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.importers import import_point_cloud
    from keyframe_worlds.addon.seed import seed_points_of

    rng = np.random.default_rng(5)
    xyz = rng.uniform(-3, 3, (300, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (300, 3)).astype(np.uint8)
    write_seed_ply(tmp_path / "points.ply", xyz, rgb)
    collection = bpy.data.collections.new("c")
    bpy.context.scene.collection.children.link(collection)
    cloud = import_point_cloud(tmp_path / "points.ply", "previous points", collection)
    cloud.location = (1.0, 2.0, 3.0)  # moved in the scene: the seed follows it
    bpy.context.view_layer.update()
    seed_xyz, seed_rgb = seed_points_of(cloud, bpy.context.evaluated_depsgraph_get())
    np.testing.assert_allclose(seed_xyz, xyz + [1.0, 2.0, 3.0], atol=1e-5)
    np.testing.assert_array_equal(seed_rgb, rgb)
