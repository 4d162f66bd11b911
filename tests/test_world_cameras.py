"""The torch camera maths (engine/world/cameras.py) equals the bridge's numpy conventions (bridge/cameras.py)."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from keyframe_worlds.bridge.cameras import c2w_to_w2c, intrinsics_matrix, project_points_opencv, unproject_pixels_opencv
from keyframe_worlds.engine.world import cameras


def _random_camera(seed: int):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = q, rng.normal(size=3) * 3
    fx, fy = rng.uniform(50, 900, 2)
    cx, cy = rng.uniform(10, 400, 2)
    return c2w, np.array([fx, fy, cx, cy])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_projection_matrices_project_like_the_bridge(seed):
    c2w, k = _random_camera(seed)
    points = np.random.default_rng(seed + 1).normal(size=(50, 3)) * 4
    uv_bridge, z_bridge = project_points_opencv(points, c2w, intrinsics_matrix(*k))
    p = cameras.projection_matrices(torch.from_numpy(c2w)[None], torch.from_numpy(k)[None])[0].numpy()
    h = np.c_[points, np.ones(len(points))] @ p.T
    front = np.abs(z_bridge) > 1e-3
    np.testing.assert_allclose(h[:, 2], z_bridge, atol=1e-9)
    np.testing.assert_allclose(h[front, :2] / h[front, 2:], uv_bridge[front], rtol=1e-9, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_unprojection_and_world_to_camera_agree_with_the_bridge(seed):
    c2w, k = _random_camera(seed)
    depth = np.random.default_rng(seed).uniform(0.5, 20, size=(6, 8)).astype(np.float32)
    ours = cameras.unproject_depth(torch.from_numpy(depth), torch.from_numpy(c2w), torch.from_numpy(k)).numpy()
    u, v = np.meshgrid(np.arange(8) + 0.5, np.arange(6) + 0.5)
    theirs = unproject_pixels_opencv(np.stack([u, v], -1).reshape(-1, 2), depth.reshape(-1), c2w, intrinsics_matrix(*k))
    np.testing.assert_allclose(ours.reshape(-1, 3), theirs, rtol=1e-4, atol=1e-3)
    rows, cols = torch.from_numpy(np.repeat(np.arange(6), 8)), torch.from_numpy(np.tile(np.arange(8), 6))
    pixels = cameras.unproject_pixels(rows, cols, torch.from_numpy(depth.reshape(-1)), torch.from_numpy(c2w), torch.from_numpy(k))
    np.testing.assert_allclose(pixels.numpy(), theirs, rtol=1e-4, atol=1e-3)
    back = cameras.world_to_camera(torch.from_numpy(theirs), torch.from_numpy(c2w)).numpy()
    np.testing.assert_allclose(back[:, 2], depth.reshape(-1), rtol=1e-5, atol=1e-4)


def test_rigid_inverse_and_intrinsics_rescaling():
    c2w = np.stack([_random_camera(s)[0] for s in range(4)])
    np.testing.assert_allclose(cameras.w2c_from_c2w_opencv(torch.from_numpy(c2w)).numpy(), c2w_to_w2c(c2w), atol=1e-6)
    k = torch.tensor([[500.0, 400.0, 320.0, 240.0]], dtype=torch.float64)
    half = cameras.rescale_intrinsics_vec(k, (640, 480), (320, 120))
    assert half.tolist() == [[250.0, 100.0, 160.0, 60.0]]
    as_matrix = cameras.rescale_intrinsics(cameras.intrinsics_matrices(k, torch.float64), (640, 480), (320, 120))
    torch.testing.assert_close(as_matrix, cameras.intrinsics_matrices(half, torch.float64))
