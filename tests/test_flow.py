"""WorldReel's 4D outputs (engine/world/flow.py) against exactly known geometry, cameras and motion.

Frames are ray-cast from scenes of boxes (engine/testing/synthetic.py): exact RGB and z-depth. A moving object is
two renders composited by depth: the still scene, and the object alone seen from the camera shifted by minus the
object's displacement (the same as the object moved, its checker texture moving with it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.engine.testing.synthetic import Box, Scene, demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast
from keyframe_worlds.engine.world import flow

W, H = 320, 240
EYE0, TARGET0 = (-0.8, -4.2, 1.6), (0.0, 2.0, 0.8)
EYE1, TARGET1 = (-0.75, -4.15, 1.62), (0.04, 2.0, 0.8)  # a small step and turn, as between two frames of a shot


def cameras():
    return look_at_c2w_opencv(EYE0, TARGET0), look_at_c2w_opencv(EYE1, TARGET1), intrinsics_for_fov(W, H, 70.0)


def render_with_moving_box(c2w, k, which: int, displacement, width=W, height=H):
    """Frame of the demo scene with box ``which`` moved by ``displacement`` (metres): rgb, depth, the box's pixels."""
    scene = demo_scene()
    still = Scene(boxes=tuple(b for i, b in enumerate(scene.boxes) if i != which))
    moving = Scene(boxes=(scene.boxes[which],))
    rgb_s, depth_s = raycast(still, c2w, k, width, height)
    shifted = c2w.clone()
    shifted[:3, 3] -= torch.tensor(displacement, dtype=torch.float64)
    rgb_o, depth_o = raycast(moving, shifted, k, width, height)
    front = (depth_o > 0) & ((depth_s == 0) | (depth_o < depth_s))
    rgb = torch.where(front[..., None], rgb_o, rgb_s)
    depth = torch.where(front, depth_o, depth_s)
    return rgb.numpy(), depth.numpy(), front.numpy()


def test_point_map_is_world_xyz_and_nan_without_a_surface():
    c2w, _c1, k = cameras()
    _rgb, depth = raycast(demo_scene(), c2w, k, W, H)
    depth = depth.numpy()
    points = flow.point_map(depth, c2w.numpy(), k.numpy())
    assert points.shape == (H, W, 3) and points.dtype == np.float32
    sky = depth == 0
    assert sky.any() and np.isnan(points[sky]).all() and np.isfinite(points[~sky]).all()
    # Every point lies on the scene's surfaces (within float32 rounding of ~10 m coordinates).
    distance = demo_scene().distance_to_surface(torch.from_numpy(points[~sky].astype(np.float64)))
    assert float(distance.max()) < 1e-5


def test_rigid_flow_equals_the_analytic_projection_to_a_thousandth_of_a_pixel():
    """Two planes (a floor z = 0 and a wall y = 6) seen from cameras that move and turn; each pixel's ray is
    intersected with them analytically in float64 and projected into the second camera by hand."""
    scene = Scene(boxes=(Box((-50, -50, -0.1), (50, 50, 0.0), (150, 150, 150)), Box((-50, 6.0, 0.0), (50, 6.1, 5.0), (90, 120, 170))))
    c0 = look_at_c2w_opencv((0.3, -3.0, 1.7), (0.5, 6.0, 2.5))
    c1 = look_at_c2w_opencv((0.6, -2.6, 1.9), (1.5, 6.0, 2.0))
    k = torch.tensor([260.0, 250.0, 161.3, 118.2], dtype=torch.float64)  # fx != fy, off-centre principal point
    _rgb, depth = raycast(scene, c0, k, W, H)
    depth = depth.numpy()
    rigid = flow.rigid_flow(flow.point_map(depth, c0.numpy(), k.numpy()), c1.numpy(), k.numpy())

    fx, fy, cx, cy = k.numpy()
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    r0, o0 = c0.numpy()[:3, :3], c0.numpy()[:3, 3]
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1) @ r0.T  # world directions, unit camera z
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = -o0[2] / rays[..., 2]
        t_wall = (6.0 - o0[1]) / rays[..., 1]
        t_floor = np.where((t_floor > 0) & (np.abs(o0[1] + t_floor * rays[..., 1]) < 50), t_floor, np.inf)
        t_wall = np.where((t_wall > 0) & (o0[2] + t_wall * rays[..., 2] < 5), t_wall, np.inf)
    t = np.minimum(t_floor, t_wall)  # the z-depth, since the rays have unit camera z
    hit = np.isfinite(t)
    np.testing.assert_array_equal(hit, depth > 0)
    world = o0 + t[hit][:, None] * rays[hit]
    cam1 = (world - c1.numpy()[:3, 3]) @ c1.numpy()[:3, :3]
    expected = np.stack([fx * cam1[:, 0] / cam1[:, 2] + cx - u[hit], fy * cam1[:, 1] / cam1[:, 2] + cy - v[hit]], -1)
    error = np.abs(rigid[hit] - expected).max()
    print(f"rigid flow: max error {error:.2e} px over {hit.sum()} pixels, |flow| up to {np.abs(expected).max():.1f} px")
    assert error < 1e-3
    assert (~hit).sum() > 1000 and np.isnan(rigid[~hit]).all()  # the sky above the wall: no surface, no flow


@pytest.mark.parametrize("eye1, target1", [(EYE1, TARGET1), ((-0.6, -4.0, 1.7), (0.2, 2.0, 0.8))], ids=["small-step", "larger-step"])
def test_dis_observed_flow_has_a_median_end_point_error_below_one_pixel_on_textured_surfaces(eye1, target1):
    c0, _c1, k = cameras()
    c1 = look_at_c2w_opencv(eye1, target1)
    scene = demo_scene()
    rgb0, depth0 = (x.numpy() for x in raycast(scene, c0, k, W, H))
    rgb1, depth1 = (x.numpy() for x in raycast(scene, c1, k, W, H))
    rigid = flow.rigid_flow(flow.point_map(depth0, c0.numpy(), k.numpy()), c1.numpy(), k.numpy())
    forward, backward = flow.DisFlow().forward_backward(rgb0, rgb1)
    assert forward.shape == backward.shape == (H, W, 2) and forward.dtype == np.float32
    import cv2

    grey = cv2.cvtColor(rgb0, cv2.COLOR_RGB2GRAY).astype(np.float32)
    local_std = np.sqrt(np.maximum(cv2.blur(grey**2, (7, 7)) - cv2.blur(grey, (7, 7)) ** 2, 0))
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    tu, tv = u + rigid[..., 0], v + rigid[..., 1]
    with np.errstate(invalid="ignore"):
        inside = (tu >= 0) & (tu < W) & (tv >= 0) & (tv < H)
    # Visible at t+1: the static point's depth in camera 1 is the depth frame 1 has there.
    z1 = np.full((H, W), np.nan)
    z1[inside] = depth1[tv[inside].astype(int), tu[inside].astype(int)]
    cam1 = (np.nan_to_num(flow.point_map(depth0, c0.numpy(), k.numpy())) - c1.numpy()[:3, 3]) @ c1.numpy()[:3, :3]
    with np.errstate(invalid="ignore"):
        visible = inside & (np.abs(cam1[..., 2] - z1) < 0.02 * z1)
    textured = visible & (local_std > 2.0)
    assert textured.sum() > 0.5 * (depth0 > 0).sum()
    epe = np.linalg.norm(forward - rigid, axis=-1)[textured]
    print(f"DIS: median end-point error {np.median(epe):.3f} px, 90th percentile {np.percentile(epe, 90):.3f} px "
          f"over {textured.sum()} pixels; |flow| median {np.median(np.linalg.norm(rigid[textured], axis=-1)):.2f} px")
    assert np.median(epe) < 1.0


@pytest.mark.parametrize("which, displacement", [(3, (0.25, 0.0, 0.0)), (4, (0.2, 0.0, 0.0)), (3, (0.3, -0.2, 0.1))],
                         ids=["red-box-sideways", "green-box-sideways", "red-box-diagonal"])
def test_a_moved_object_is_dynamic_and_its_scene_flow_is_its_displacement(which, displacement):
    c0, c1, k = cameras()
    rgb0, depth0, on_box = render_with_moving_box(c0, k, which, (0.0, 0.0, 0.0))
    rgb1, depth1, _ = render_with_moving_box(c1, k, which, displacement)
    points0 = flow.point_map(depth0, c0.numpy(), k.numpy())
    points1 = flow.point_map(depth1, c1.numpy(), k.numpy())
    pair = flow.pair_geometry(flow.DisFlow(), rgb0, points0, rgb1, depth1, points1, c1.numpy(), k.numpy())
    assert set(np.unique(pair.mask)) <= {flow.MASK_STATIC, flow.MASK_UNCHECKED, flow.MASK_DYNAMIC}

    dynamic = pair.mask == flow.MASK_DYNAMIC
    rest = ~on_box & (depth0 > 0)
    iou = (dynamic & on_box).sum() / (dynamic | on_box).sum()
    false_positives = (dynamic & rest).sum() / rest.sum()
    print(f"box {which} moved {displacement}: IoU {iou:.3f}, false positives {100 * false_positives:.2f}% of the static rest "
          f"({(pair.mask[rest] == flow.MASK_UNCHECKED).mean():.1%} of it unchecked)")
    assert iou >= 0.7
    assert false_positives < 0.02

    measured = pair.scene[on_box]
    measured = measured[np.isfinite(measured).all(-1)]
    assert len(measured) > 0.5 * on_box.sum()
    median = np.median(measured, axis=0)
    truth = np.array(displacement)
    relative = np.linalg.norm(median - truth) / np.linalg.norm(truth)
    still = pair.scene[rest]
    still = np.linalg.norm(still[np.isfinite(still).all(-1)], axis=-1)
    print(f"scene flow of the box: median {np.round(median, 4)} m, true {truth}, error {100 * relative:.2f}%; "
          f"static rest: median |motion| {1000 * np.median(still):.1f} mm")
    assert relative < 0.05
    assert np.median(still) < 0.1 * np.linalg.norm(truth)  # an order of magnitude below the box's own motion


def test_a_static_world_seen_consistently_is_not_dynamic():
    c0, c1, k = cameras()
    scene = demo_scene()
    rgb0, depth0 = (x.numpy() for x in raycast(scene, c0, k, W, H))
    rgb1, depth1 = (x.numpy() for x in raycast(scene, c1, k, W, H))
    pair = flow.pair_geometry(flow.DisFlow(), rgb0, flow.point_map(depth0, c0.numpy(), k.numpy()), rgb1, depth1,
                              flow.point_map(depth1, c1.numpy(), k.numpy()), c1.numpy(), k.numpy())
    surface = depth0 > 0
    assert (pair.mask[surface] == flow.MASK_DYNAMIC).mean() < 0.01
    assert (pair.mask[surface] == flow.MASK_STATIC).mean() > 0.6
    assert (pair.mask[~surface] == flow.MASK_UNCHECKED).all()  # no surface, nothing to compare
    assert np.isnan(pair.rigid[~surface]).all() and np.isnan(pair.scene[~surface]).all()


def test_the_outputs_are_the_same_every_time():
    """A resumed job recomputes the flow of the frame before its restart: it must come out bit for bit the same."""
    c0, c1, k = cameras()
    rgb0, depth0, _ = render_with_moving_box(c0, k, 3, (0.0, 0.0, 0.0))
    rgb1, depth1, _ = render_with_moving_box(c1, k, 3, (0.25, 0.0, 0.0))
    args = (rgb0, flow.point_map(depth0, c0.numpy(), k.numpy()), rgb1, depth1, flow.point_map(depth1, c1.numpy(), k.numpy()),
            c1.numpy(), k.numpy())
    a = flow.pair_geometry(flow.DisFlow(), *args)
    b = flow.pair_geometry(flow.DisFlow(), *args)
    for name in ("observed", "rigid", "scene", "mask", "backward"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_consistency_cells_score_points_by_their_source_pixels():
    c0, _c1, k = cameras()
    mask = np.full((H, W), flow.MASK_STATIC, np.uint8)
    mask[:, : W // 2] = flow.MASK_DYNAMIC  # the left half contradicts the geometry
    mask[: H // 4] = flow.MASK_UNCHECKED  # the top quarter was not checked
    cells = flow.ConsistencyCells.from_mask(mask)
    _rgb, depth = raycast(demo_scene(), c0, k, W, H)
    points = flow.point_map(depth.numpy(), c0.numpy(), k.numpy())
    rows, cols = np.mgrid[0:H, 0:W]
    surface = np.isfinite(points[..., 0])
    score = cells.at_points(points[surface], c0.numpy(), k.numpy())
    left, top = cols[surface] < W // 2 - 8, rows[surface] < H // 4 - 8
    right = cols[surface] >= W // 2 + 8
    assert score.dtype == np.float32 and ((score >= 0) & (score <= 1)).all()
    np.testing.assert_array_equal(score[left & ~top & (rows[surface] >= H // 4 + 8)], 0.0)
    np.testing.assert_array_equal(score[right & ~top], 1.0)
    np.testing.assert_array_equal(score[top], 1.0)  # nothing checked: no contradiction seen
    behind = cells.at_points(np.array([[0.0, -10.0, 1.0]], np.float32), c0.numpy(), k.numpy())  # behind the camera
    np.testing.assert_array_equal(behind, 1.0)


def test_raft_needs_local_weights_and_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv(flow.RAFT_WEIGHTS_ENV, raising=False)
    with pytest.raises(KeyframeWorldsError, match=flow.RAFT_WEIGHTS_ENV):
        flow.flow_estimator("raft")
    with pytest.raises(KeyframeWorldsError, match="not found|torchvision"):
        flow.flow_estimator("raft", raft_weights=tmp_path / "missing.pth")
    with pytest.raises(KeyframeWorldsError, match="unknown flow method"):
        flow.flow_estimator("farneback")
    assert flow.flow_estimator("none") is None


def test_raft_from_a_local_state_dict(tmp_path):
    import torchvision.models.optical_flow as tv  # the engine's extra installs the torchvision of its torch

    torch.manual_seed(0)
    weights = tmp_path / "raft_small.pth"
    torch.save(tv.raft_small(weights=None).state_dict(), weights)
    estimator = flow.RaftFlow(weights)
    c0, c1, k = cameras()
    rgb0 = raycast(demo_scene(), c0, k, 100, 60)[0].numpy()  # not a multiple of 8: padded inside
    rgb1 = raycast(demo_scene(), c1, k, 100, 60)[0].numpy()
    forward, backward = estimator.forward_backward(rgb0, rgb1)
    assert forward.shape == backward.shape == (60, 100, 2) and np.isfinite(forward).all()


def test_a_job_with_raft_flow_writes_it_in_the_bundle(tmp_path, monkeypatch):
    """geometry.flow = "raft" with a local torchvision state dict: the bundle's observed flow is RAFT's (not DIS's),
    in EXR with u/v channels, read back by the OpenEXR bindings."""
    import json

    import OpenEXR
    import torchvision.models.optical_flow as tv

    from keyframe_worlds.bridge.spec import load_job, load_manifest
    from keyframe_worlds.engine.run.runner import run_job
    from keyframe_worlds.engine.testing.service import write_preview_job

    torch.manual_seed(0)
    weights = tmp_path / "raft_small.pth"
    torch.save(tv.raft_small(weights=None).state_dict(), weights)
    monkeypatch.setenv(flow.RAFT_WEIGHTS_ENV, str(weights))
    observed = {}
    for method in ("raft", "dis"):
        spec_path = write_preview_job(tmp_path / method, frames=3, segment_length=3, width=64, height=48)
        doc = json.loads(spec_path.read_text())
        doc["geometry"] = {"flow": method}
        spec_path.write_text(json.dumps(doc))
        run_job(load_job(spec_path), tmp_path / method / "out")
        frame = load_manifest(tmp_path / method / "out").trajectories[0].frames[0]
        with OpenEXR.File(str(tmp_path / method / "out" / frame.flow_observed)) as exr:
            channels = exr.channels()
            assert {"u", "v"} <= set(channels), channels
            observed[method] = np.stack([channels["u"].pixels, channels["v"].pixels], -1)
    assert observed["raft"].shape == (48, 64, 2) and np.isfinite(observed["raft"]).all()
    assert not np.allclose(observed["raft"], observed["dis"]), "the raft job used DIS"
