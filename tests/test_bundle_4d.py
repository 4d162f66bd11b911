"""The bundle's 4D outputs as files: what the manifest lists exists, reads with independent readers (the OpenEXR
bindings, Pillow) and holds what engine/world/flow.py computes; the fused cloud's consistency; old bundles; resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from keyframe_worlds.bridge import ply
from keyframe_worlds.bridge.client import manifest_paths
from keyframe_worlds.bridge.spec import FOUR_D_KEYS, load_manifest, validate_manifest
from keyframe_worlds.bridge.trajectory import Trajectory
from keyframe_worlds.engine.run import checkpoint
from keyframe_worlds.engine.run.bundle import BundleWriter
from keyframe_worlds.engine.testing.service import tree_digest
from keyframe_worlds.engine.testing.synthetic import Scene, demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast
from keyframe_worlds.engine.world import flow

W, H = 240, 180
MOVING = 3  # the red box
STEP = np.array([0.25, 0.0, 0.0])  # metres per frame: about 7 px at this size


def sequence(n: int = 4, moving: bool = True, name: str = "Cam"):
    """A camera stepping and turning through the demo scene while the red box slides along +X (when ``moving``)."""
    k = intrinsics_for_fov(W, H, 70.0)
    cams = [look_at_c2w_opencv((-0.8 + 0.03 * i, -4.2 + 0.03 * i, 1.6 + 0.01 * i), (0.02 * i, 2.0, 0.8)) for i in range(n)]
    scene = demo_scene()
    still = Scene(boxes=tuple(b for j, b in enumerate(scene.boxes) if j != MOVING))
    box = Scene(boxes=(scene.boxes[MOVING],))
    frames = []
    for i, c2w in enumerate(cams):
        rgb_s, depth_s = raycast(still, c2w, k, W, H)
        shifted = c2w.clone()
        shifted[:3, 3] -= torch.from_numpy(STEP * i if moving else 0 * STEP)
        rgb_o, depth_o = raycast(box, shifted, k, W, H)
        front = (depth_o > 0) & ((depth_s == 0) | (depth_o < depth_s))
        frames.append((torch.where(front[..., None], rgb_o, rgb_s).numpy(), torch.where(front, depth_o, depth_s).numpy(), front.numpy()))
    traj = Trajectory(name=name, frames=list(range(10, 10 + n)), c2w_opencv=np.stack([c.numpy() for c in cams]),
                      fx=float(k[0]), fy=float(k[1]), cx=float(k[2]), cy=float(k[3]), width=W, height=H, fps=24)
    return traj, frames


def write_bundle(root, trajectories, **options) -> BundleWriter:
    writer = BundleWriter(root, "four-d", "preview", "test", **options)
    for traj, frames in trajectories:
        out = writer.trajectory(traj)
        for i, (rgb, depth, _box) in enumerate(frames):
            out.write_frame(i, rgb, depth)
        writer.add(out)
    return writer


def read_exr_channels(path) -> dict[str, np.ndarray]:
    import OpenEXR

    with OpenEXR.File(str(path)) as f:
        return {name: np.array(ch.pixels) for name, ch in f.channels().items()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle4d")
    traj, frames = sequence()
    writer = write_bundle(root, [(traj, frames)])
    rgb0, depth0, box0 = frames[0]
    points = flow.point_map(depth0, traj.c2w_opencv[0], [traj.fx[0], traj.fy[0], traj.cx[0], traj.cy[0]])
    surface = np.isfinite(points[..., 0])
    # The cloud: frame 0's surface points (global frame 1), and the same points again as the reference's (frame 0).
    positions = np.concatenate([points[surface], points[surface]])
    source = np.concatenate([np.full(surface.sum(), 1), np.zeros(surface.sum())]).astype(np.int32)
    writer.write_point_cloud(positions, np.zeros((len(positions), 3), np.uint8), np.ones(len(positions), np.float32), source)
    writer.finish()
    return root, traj, frames, box0[surface], writer


def test_the_manifest_lists_every_4d_file_and_they_exist(bundle):
    root, traj, frames, _box, _writer = bundle
    doc = json.loads((root / "manifest.json").read_text())
    assert validate_manifest(doc, root) == []
    files = doc["trajectories"][0]["files"]
    for i, entry in enumerate(files):
        assert set(FOUR_D_KEYS) <= set(entry)  # always present, null when absent
        assert entry["point_map"] == f"pointmaps/Cam/{traj.frames[i]:06d}.exr"
        last = i == len(files) - 1
        for key in ("flow_observed", "flow_rigid", "scene_flow", "dynamic_mask"):
            assert (entry[key] is None) == last, (i, key)  # the camera's last frame has no next frame
            if not last:
                assert (root / entry[key]).is_file()
    listed = manifest_paths(doc)  # what download_bundle fetches
    assert {e[k] for e in files for k in FOUR_D_KEYS if e[k]} <= listed and None not in listed


def test_the_4d_files_read_with_the_openexr_library_and_hold_the_computed_values(bundle):
    root, traj, frames, _box, _writer = bundle
    manifest = load_manifest(root)
    entries = manifest.trajectories[0].frames
    intr = [np.array([traj.fx[i], traj.fy[i], traj.cx[i], traj.cy[i]]) for i in range(len(traj))]
    for i, entry in enumerate(entries):
        rgb, depth, _ = frames[i]
        channels = read_exr_channels(root / entry.point_map)
        assert set(channels) == {"X", "Y", "Z"} and all(c.dtype == np.float32 and c.shape == (H, W) for c in channels.values())
        points = flow.point_map(depth, traj.c2w_opencv[i], intr[i])
        np.testing.assert_array_equal(np.stack([channels[c] for c in "XYZ"], -1), points)  # NaN where no surface
        assert np.isnan(channels["X"][depth == 0]).all()
        if entry.flow_observed is None:
            continue
        rgb1, depth1, _ = frames[i + 1]
        points1 = flow.point_map(depth1, traj.c2w_opencv[i + 1], intr[i + 1])
        pair = flow.pair_geometry(flow.DisFlow(), rgb, points, rgb1, depth1, points1, traj.c2w_opencv[i + 1], intr[i + 1])
        for key, want in ((entry.flow_observed, pair.observed), (entry.flow_rigid, pair.rigid)):
            uv = read_exr_channels(root / key)
            assert set(uv) == {"u", "v"} and uv["u"].dtype == np.float32
            np.testing.assert_array_equal(np.stack([uv["u"], uv["v"]], -1), want)
        scene = read_exr_channels(root / entry.scene_flow)
        assert set(scene) == {"X", "Y", "Z"}
        np.testing.assert_array_equal(np.stack([scene[c] for c in "XYZ"], -1), pair.scene)
        with Image.open(root / entry.dynamic_mask) as image:
            assert image.mode == "L" and image.size == (W, H)
            mask = np.asarray(image)
        np.testing.assert_array_equal(mask, pair.mask)
        assert (mask[frames[i][2]] == flow.MASK_DYNAMIC).mean() > 0.5  # the sliding box


def test_the_fused_cloud_has_a_consistency_attribute_from_the_masks(bundle):
    root, _traj, _frames, box, _writer = bundle
    cloud = ply.read_ply(root / "points.ply")
    consistency = cloud.vertex["consistency"]
    assert consistency.dtype == np.float32 and ((consistency >= 0) & (consistency <= 1)).all()
    half = len(consistency) // 2
    from_frame, from_reference = consistency[:half], consistency[half:]
    print(f"consistency: box median {np.median(from_frame[box]):.2f}, still rest median {np.median(from_frame[~box]):.2f}")
    assert np.median(from_frame[box]) < 0.5 and np.median(from_frame[~box]) > 0.95
    np.testing.assert_array_equal(from_reference, 1.0)  # the reference: nothing to check it against


def test_consistency_after_a_resume_is_counted_again_from_the_mask_files(bundle):
    root, traj, frames, _box, writer = bundle
    rgb, depth, _ = frames[1]
    points = flow.point_map(depth, traj.c2w_opencv[1], [traj.fx[1], traj.fy[1], traj.cx[1], traj.cy[1]])
    points = points[np.isfinite(points[..., 0])]
    source = np.full(len(points), 2)
    in_memory = writer.point_consistency(points, source)
    writer.consistency_cells.clear()  # as after a restart: only the files remain
    np.testing.assert_array_equal(writer.point_consistency(points, source), in_memory)
    assert in_memory.min() < 1.0


def test_global_frame_indices_continue_across_cameras(tmp_path):
    still, still_frames = sequence(3, moving=False, name="Still")
    moving, moving_frames = sequence(3, moving=True, name="Moving")
    writer = write_bundle(tmp_path, [(still, still_frames), (moving, moving_frames)])
    _rgb, depth, box = moving_frames[0]
    points = flow.point_map(depth, moving.c2w_opencv[0], [moving.fx[0], moving.fy[0], moving.cx[0], moving.cy[0]])
    surface = np.isfinite(points[..., 0])
    # Moving's first frame is global frame 1 + len(Still) = 4; read as Still's first frame (1) it would find no motion.
    as_moving = writer.point_consistency(points[surface], np.full(surface.sum(), 1 + len(still)))
    as_still = writer.point_consistency(points[surface], np.full(surface.sum(), 1))
    assert np.median(as_moving[box[surface]]) < 0.5 < np.median(as_still[box[surface]])


def test_flow_none_and_point_maps_off_write_no_4d_files(tmp_path):
    traj, frames = sequence(3)
    writer = write_bundle(tmp_path, [(traj, frames)], flow="none", point_maps=False)
    writer.write_point_cloud(np.zeros((5, 3), np.float32), np.zeros((5, 3), np.uint8), np.ones(5, np.float32), np.ones(5, np.int32))
    manifest = writer.finish()
    for entry in manifest.trajectories[0].frames:
        assert all(getattr(entry, key) is None for key in FOUR_D_KEYS)
    for folder in ("pointmaps", "flow", "rigidflow", "sceneflow", "dynamic"):
        assert not (tmp_path / folder).exists()
    np.testing.assert_array_equal(ply.read_ply(tmp_path / "points.ply").vertex["consistency"], 1.0)
    only_points = write_bundle(tmp_path / "pm", [(traj, frames)], flow="none", point_maps=True).finish()
    assert all(f.point_map and f.flow_observed is None for f in only_points.trajectories[0].frames)
    with pytest.raises(Exception, match="unknown flow method"):
        BundleWriter(tmp_path / "bad", "x", "preview", "test", flow="farneback")


def test_a_bundle_written_before_the_4d_outputs_still_validates(bundle, tmp_path):
    import shutil

    root = tmp_path / "old"
    shutil.copytree(bundle[0], root)
    doc = json.loads((root / "manifest.json").read_text())
    for traj in doc["trajectories"]:
        for entry in traj["files"]:
            for key in FOUR_D_KEYS:
                del entry[key]
    (root / "manifest.json").write_text(json.dumps(doc))
    manifest = load_manifest(root)
    assert all(getattr(f, key) is None for f in manifest.trajectories[0].frames for key in FOUR_D_KEYS)
    # A listed 4D file that is missing is named like any other.
    doc = json.loads((bundle[0] / "manifest.json").read_text())
    (root / doc["trajectories"][0]["files"][1]["flow_rigid"]).unlink(missing_ok=True)
    shutil.rmtree(root / "rigidflow")
    problems = validate_manifest(doc, root)
    assert [p.path for p in problems] == [f"trajectories[0].files[{i}].flow_rigid" for i in range(3)]


def test_a_resumed_camera_writes_the_same_files_as_an_uninterrupted_one(tmp_path):
    """The runner's resume, by hand: frames 0-2 written, the writer dropped (a kill), a new writer replays them from
    disk and goes on. Frame 2's flow needed frame 3, which only the resumed writer saw."""
    traj, frames = sequence(6)
    write_bundle(tmp_path / "whole", [(traj, frames)]).finish()

    first = BundleWriter(tmp_path / "resumed", "four-d", "preview", "test")
    out = first.trajectory(traj)
    for i in range(3):
        out.write_frame(i, *frames[i][:2])
    out.flush()
    written = list(out.frames)
    out.abort()  # killed: no close, no video, no flow for frame 2
    assert not (tmp_path / "resumed" / written[2].flow_observed).exists()

    second = BundleWriter(tmp_path / "resumed", "four-d", "preview", "test")
    out = second.trajectory(traj)
    checkpoint.replay_video(out, written)
    for i in range(3, 6):
        out.write_frame(i, *frames[i][:2])
    second.add(out)
    second.finish()
    assert tree_digest(tmp_path / "resumed") == tree_digest(tmp_path / "whole")


def test_a_preview_job_writes_the_4d_outputs_and_its_static_world_is_consistent(tmp_path):
    from keyframe_worlds.bridge.spec import load_job
    from keyframe_worlds.engine.io.images import write_png
    from keyframe_worlds.engine.run.runner import run_job

    k = intrinsics_for_fov(128, 96, 75.0)
    path = [look_at_c2w_opencv((0.1 * i, -3.6 + 0.05 * i, 1.7), (0.0, 1.5, 0.6)) for i in range(6)]
    rgb, depth = raycast(demo_scene(), path[0], k, 128, 96)
    write_png(tmp_path / "ref.png", rgb.numpy())
    np.save(tmp_path / "ref_depth.npy", depth.numpy())
    frames = [{"frame": i + 1, "c2w_opencv": c.tolist(), "fx": float(k[0]), "fy": float(k[1]), "cx": float(k[2]), "cy": float(k[3])}
              for i, c in enumerate(path)]
    job = {"version": 1, "name": "four-d", "generator": "preview", "reference": {"image": "ref.png", "depth": "ref_depth.npy"},
           "trajectories": [{"name": "Camera", "fps": 24.0, "width": 128, "height": 96, "frames": frames}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    manifest = run_job(load_job(tmp_path / "job.json"), tmp_path / "out")
    entries = manifest.trajectories[0].frames
    assert all(f.point_map for f in entries) and all(f.flow_observed for f in entries[:-1]) and entries[-1].flow_observed is None
    load_manifest(tmp_path / "out")  # every listed file exists
    for f in entries[:-1]:
        mask = np.asarray(Image.open(tmp_path / "out" / f.dynamic_mask))
        # The preview renders one memory along the cameras: its video agrees with its own geometry.
        assert (mask == flow.MASK_DYNAMIC).mean() < 0.01 and (mask == flow.MASK_STATIC).mean() > 0.8
    consistency = ply.read_ply(tmp_path / "out" / "points.ply").vertex["consistency"]
    assert consistency.mean() > 0.99
