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
from keyframe_worlds.engine.world.depth_alignment import AlignedLearnedDepth
from keyframe_worlds.engine.world.learned_depth import RELATIVE_DISPARITY, DepthPrediction

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


def accuracy_job(tmp_path):
    """A preview job on the scene: the reference with its true depth, and a camera that moves a little from it
    (most of what it sees is covered). Returns the job file and the path's cameras."""
    s = scene()
    k, cams = views()
    rgb, depth = raycast(s, cams[0], k, W, H)
    write_png(tmp_path / "ref.png", rgb.numpy())
    np.save(tmp_path / "ref_depth.npy", depth.numpy())
    path = [look_at_c2w_opencv((0.1 * i, -3.6 + 0.05 * i, 1.7), (0.0, 1.5, 0.6)) for i in range(8)]
    frames = [{"frame": i, "c2w_opencv": c.tolist(), "fx": float(k[0]), "fy": float(k[1]), "cx": float(k[2]), "cy": float(k[3])}
              for i, c in enumerate(path)]
    job = {"version": 1, "name": "accuracy", "generator": "preview",
           "reference": {"image": "ref.png", "depth": "ref_depth.npy"},
           "trajectories": [{"name": "Camera", "fps": 24.0, "width": W, "height": H, "frames": frames}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    return tmp_path / "job.json", path


def test_preview_job_point_cloud_and_cameras(tmp_path):
    s = scene()
    k, _ = views()
    job, path = accuracy_job(tmp_path)
    spec = load_job(job)
    run_job(spec, tmp_path / "out")
    manifest = load_manifest(tmp_path / "out")
    assert manifest.trajectories[0].trajectory == spec.trajectories[0]  # cameras out == cameras in
    cloud = ply.read_ply(tmp_path / "out" / manifest.point_cloud)
    tau = 0.01 * s.size_m
    precision, recall, f = f_score(cloud.positions(), s, k, path, tau)
    print(f"preview job: precision {precision:.3f} recall {recall:.3f} F {f:.3f}")
    assert f >= 0.95, (precision, recall, f)


class SeesTheScene:
    """A stand-in depth network that sees each generated frame's true geometry, as a relative network does: the
    disparity under a scale and shift it does not know (others per call), with 1% noise and 10% of the pixels wrong.
    The first call is the reference's (the runner fills what its given depth lacks); the later ones come in frame
    order (the preview generator's segments), so the n-th frame it is asked about is the path's n-th camera."""

    def __init__(self, s: Scene, k: torch.Tensor, reference: torch.Tensor, path: list[torch.Tensor]):
        self.reference = raycast(s, reference, k, W, H)[1]
        self.truth = [raycast(s, c2w, k, W, H)[1] for c2w in path]
        self.asked = 0
        self.reference_asked = False
        self.generator = torch.Generator().manual_seed(3)

    def predict(self, rgb, rendered=None, *, intrinsics=None):
        if not self.reference_asked:
            self.reference_asked = True
            z = self.reference[None]
        else:
            z = torch.stack(self.truth[self.asked : self.asked + rgb.shape[0]])
            self.asked += rgb.shape[0]
        scale, shift = 0.5 + float(torch.rand((), generator=self.generator)), 0.3 * float(torch.rand((), generator=self.generator))
        disparity = torch.where(z > 0, 1.0 / z.clamp_min(0.05), 0.0)
        disparity = disparity * (1 + 0.01 * torch.randn(z.shape, generator=self.generator))
        wrong = torch.rand(z.shape, generator=self.generator) < 0.1
        disparity = torch.where(wrong, torch.rand(z.shape, generator=self.generator) * disparity.max(), disparity)
        return DepthPrediction(values=(scale * disparity + shift).float(), kind=RELATIVE_DISPARITY)


def test_a_learned_network_keeps_the_fused_cloud_at_least_as_accurate(tmp_path):
    """Issue 13's check: with a depth network (aligned to the memory, then fused), the fused cloud's F-score against
    the scene is at least the memory-only path's, measured on the same job in the same run."""
    s = scene()
    k, cams = views()
    job, path = accuracy_job(tmp_path)
    tau = 0.01 * s.size_m
    scores = {}
    network = SeesTheScene(s, k, cams[0], path)
    for name, estimator in (("memory only", None), ("network", AlignedLearnedDepth(network))):
        out = tmp_path / name.replace(" ", "_")
        manifest = run_job(load_job(job), out, depth_estimator=estimator)
        scores[name] = f_score(ply.read_ply(out / manifest.point_cloud).positions(), s, k, path, tau)
        print(f"{name}: precision {scores[name][0]:.4f} recall {scores[name][1]:.4f} F {scores[name][2]:.4f}")
    assert network.reference_asked and network.asked == len(path), "the network saw the reference and every frame once"
    assert scores["network"][2] >= scores["memory only"][2], scores
