"""Accuracy of the fused point cloud against exactly known geometry (planes and boxes).

The tests ray-cast a scene of axis-aligned boxes (floor and walls are thin
boxes) to RGB-D with known cameras, fuse it, export the PLY, read it back,
and score it: precision = share of exported points within tau of the true
surface (exact distance to the boxes), recall = share of true surface samples
in the views' coverage (ray-cast between the pixel centres) that have an
exported point within tau; tau = 1% of the scene's size.
"""

import json

import numpy as np
import torch

from keyframe_worlds.bridge import ply
from keyframe_worlds.bridge.spec import load_job, load_manifest
from keyframe_worlds.engine.run.bundle import BundleWriter
from keyframe_worlds.engine.io.images import write_png
from keyframe_worlds.engine.world.memory import PointMemory
from keyframe_worlds.engine.run.runner import run_job
from keyframe_worlds.engine.testing.synthetic import Box, Scene, intrinsics_for_fov, look_at_c2w_opencv, raycast

W, H = 128, 96


def scene() -> Scene:
    return Scene(boxes=(
        Box((-4, -4, -0.05), (4, 4, 0.0), (160, 150, 130), 0.8),  # floor plane
        Box((-4, 4, 0.0), (4, 4.05, 2.5), (80, 110, 170), 0.6),  # back wall
        Box((-4.05, -4, 0.0), (-4, 4, 2.5), (150, 90, 80), 0.6),  # left wall
        Box((-1.0, 0.5, 0.0), (0.4, 1.9, 1.1), (200, 60, 50), 0.3),
        Box((1.2, -0.5, 0.0), (2.2, 0.5, 1.8), (60, 170, 80), 0.25),
        Box((-2.8, -1.5, 0.0), (-2.0, -0.7, 0.5), (220, 200, 60), 0.2),
    ))


def views():
    k = intrinsics_for_fov(W, H, 75.0)
    eyes = [((0.0, -3.6, 1.7), (0.0, 1.5, 0.6)), ((-2.5, -3.3, 1.9), (-0.5, 1.0, 0.5)),
            ((2.8, -3.0, 1.6), (0.5, 1.5, 0.7)), ((-3.2, 0.5, 2.2), (0.5, 1.0, 0.4))]
    return k, [look_at_c2w_opencv(e, t) for e, t in eyes]


def nearest_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """For each point of a (N, 3), the distance to the nearest point of b (M, 3)."""
    out = []
    for i in range(0, a.shape[0], chunk):
        out.append(torch.cdist(a[i : i + chunk].double(), b.double()).min(dim=1).values)
    return torch.cat(out)


def covered(points: torch.Tensor, s: Scene, k, cams) -> torch.Tensor:
    """(N,) bool: the point projects into a pixel of some view where that view sees a surface."""
    keep = torch.zeros(points.shape[0], dtype=torch.bool)
    fx, fy, cx, cy = k.tolist()
    for c2w in cams:
        _, depth = raycast(s, c2w, k, W, H)
        cam = (points.double() - c2w[:3, 3]) @ c2w[:3, :3]
        z = cam[:, 2].clamp_min(1e-9)
        u = (fx * cam[:, 0] / z + cx).floor().long()
        v = (fy * cam[:, 1] / z + cy).floor().long()
        inside = (cam[:, 2] > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        hit = torch.zeros_like(inside)
        hit[inside] = depth[v[inside], u[inside]] > 0
        keep |= hit
    return keep


def f_score(points: np.ndarray, s: Scene, k, cams, tau: float) -> tuple[float, float, float]:
    pts = torch.from_numpy(points)
    # Precision over the region the views cover (points seen against a surface of some view);
    # recall over surface samples of those views.
    pts = pts[covered(pts, s, k, cams)]
    precision = float((s.distance_to_surface(pts) < tau).double().mean())
    truth = []
    for c2w in cams:
        # Surface samples at the pixel corners, between the fused pixel centres.
        _, depth = raycast(s, c2w, k, W, H, pixel_offset=(0.0, 0.0))
        world = _unproject_at_corners(depth, c2w, k)[depth > 0]
        truth.append(world[::3])
    truth = torch.cat(truth)
    recall = float((nearest_distance(truth, pts.float()) < tau).double().mean())
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


def _unproject_at_corners(depth, c2w, k):
    """World points of z-depths measured along the rays through pixel (col, row) corners."""
    fx, fy, cx, cy = k.tolist()
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    z = depth.double()
    cam = torch.stack([(u - cx) / fx * z, (v - cy) / fy * z, z], -1)
    return (cam @ c2w[:3, :3].T + c2w[:3, 3]).float()


def test_fused_point_cloud_matches_the_true_geometry(tmp_path):
    s = scene()
    k, cams = views()
    memory = PointMemory(max_points=30000)
    for i, c2w in enumerate(cams):
        rgb, depth = raycast(s, c2w, k, W, H)
        memory.fuse(rgb, depth, c2w, k, frame_index=i, confidence=1.0)
    assert len(memory) <= 30000
    bundle = BundleWriter(tmp_path, "accuracy", "preview", "test")
    bundle.write_point_cloud(memory.positions_world.numpy(), memory.colors.numpy(), memory.confidence.numpy(), memory.frame_index.numpy())
    cloud = ply.read_ply(tmp_path / "points.ply")
    tau = 0.01 * s.size_m
    precision, recall, f = f_score(cloud.positions(), s, k, cams, tau)
    print(f"fused views: precision {precision:.3f} recall {recall:.3f} F {f:.3f}")
    assert precision > 0.99 and recall > 0.95 and f >= 0.95, (precision, recall, f)
    # Colours survive the round trip.
    np.testing.assert_array_equal(cloud.colors_u8(), memory.colors.numpy())


def test_preview_job_point_cloud_and_cameras(tmp_path):
    s = scene()
    k, cams = views()
    rgb, depth = raycast(s, cams[0], k, W, H)
    write_png(tmp_path / "ref.png", rgb.numpy())
    np.save(tmp_path / "ref_depth.npy", depth.numpy())
    # A camera that moves a little from the reference: most of what it sees is covered.
    path = [look_at_c2w_opencv((0.1 * i, -3.6 + 0.05 * i, 1.7), (0.0, 1.5, 0.6)) for i in range(8)]
    frames = [{"frame": i, "c2w_opencv": c.tolist(), "fx": float(k[0]), "fy": float(k[1]), "cx": float(k[2]), "cy": float(k[3])}
              for i, c in enumerate(path)]
    job = {"version": 1, "name": "accuracy", "generator": "preview",
           "reference": {"image": "ref.png", "depth": "ref_depth.npy"},
           "trajectories": [{"name": "Camera", "fps": 24.0, "width": W, "height": H, "frames": frames}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    spec = load_job(tmp_path / "job.json")
    run_job(spec, tmp_path / "out")
    manifest = load_manifest(tmp_path / "out")
    assert manifest.trajectories[0].trajectory == spec.trajectories[0]  # cameras out == cameras in
    cloud = ply.read_ply(tmp_path / "out" / manifest.point_cloud)
    tau = 0.01 * s.size_m
    precision, recall, f = f_score(cloud.positions(), s, k, path, tau)
    print(f"preview job: precision {precision:.3f} recall {recall:.3f} F {f:.3f}")
    assert f >= 0.95, (precision, recall, f)
