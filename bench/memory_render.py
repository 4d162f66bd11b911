"""Render the point memory into 832x480 RGB + z-depth + mask: ours vs a plain torch scatter z-buffer vs Open3D.

Run: .venv/bin/python bench/memory_render.py [--points 1000000] [--frames 30]

All three render the same 1,000,000 points (a ray-cast room lifted to a point
cloud) along the same moving camera, one frame at a time, in one process.
Ours draws 3x3 splats (radius 1); the two others draw one pixel per point, so
ours does more work per frame. Figures are medians over the frames.
On a CUDA machine it also renders 5,000,000 points on the GPU (target: 100 fps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keyframe_worlds.engine.world.cameras import projection_matrices  # noqa: E402
from keyframe_worlds.engine.world.render import PointRenderer  # noqa: E402
from keyframe_worlds.engine.testing.synthetic import demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast  # noqa: E402

W, H = 832, 480


def make_cloud(n_points: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """About n_points world points with colours: a ray-cast RGB-D image lifted, topped up with jittered copies."""
    from keyframe_worlds.engine.world.cameras import unproject_depth

    scene = demo_scene()
    side = int((n_points * 1.8) ** 0.5)
    w, h = side, int(side / 1.8)
    k = intrinsics_for_fov(w, h, 80.0)
    c2w = look_at_c2w_opencv((0.0, -4.5, 1.7), (0.0, 2.0, 0.9))
    rgb, depth = raycast(scene, c2w, k, w, h)
    valid = depth > 0
    points = unproject_depth(depth, c2w, k)[valid]
    colors = rgb[valid]
    g = torch.Generator().manual_seed(seed)
    while points.shape[0] < n_points:
        extra = min(n_points - points.shape[0], points.shape[0])
        pick = torch.randperm(points.shape[0], generator=g)[:extra]
        points = torch.cat([points, points[pick] + 0.002 * torch.randn(extra, 3, generator=g)])
        colors = torch.cat([colors, colors[pick]])
    perm = torch.randperm(points.shape[0], generator=g)[:n_points]
    return points[perm].contiguous(), colors[perm].contiguous()


def camera_path(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4, 4) c2w_opencv walking sideways and turning a little; (n, 4) intrinsics."""
    c2w = torch.stack([
        look_at_c2w_opencv((-0.8 + 1.6 * i / max(n - 1, 1), -4.0, 1.6), (0.3 * np.sin(i / 5), 2.0, 0.9))
        for i in range(n)
    ]).to(torch.float32)
    k = intrinsics_for_fov(W, H, 75.0).to(torch.float32).repeat(n, 1)
    return c2w, k


def time_frames(fn, n_frames: int, sync=lambda: None) -> list[float]:
    times = []
    for i in range(n_frames):
        sync()
        t0 = time.perf_counter()
        fn(i)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def scatter_baseline(points: torch.Tensor, colors: torch.Tensor, projection: torch.Tensor):
    """The plain torch z-buffer: float scatter_reduce(amin) of depth, then the winners write their colour."""
    proj = projection.to(torch.float32)
    uvz = points @ proj[:, :3].T + proj[:, 3]
    z = uvz[:, 2]
    u = uvz[:, 0] / z
    v = uvz[:, 1] / z
    keep = (z > 1e-3) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    z, u, v, idx = z[keep], u[keep], v[keep], torch.nonzero(keep).squeeze(1)
    pixel = v.long() * W + u.long()
    depth = torch.full((H * W,), float("inf"))
    depth.scatter_reduce_(0, pixel, z, reduce="amin")
    winner = z == depth[pixel]
    rgb = torch.zeros(H * W, 3, dtype=torch.uint8)
    rgb[pixel[winner]] = colors[idx[winner]]
    mask = torch.isfinite(depth)
    return rgb.view(H, W, 3), torch.where(mask, depth, 0.0).view(H, W), mask.view(H, W)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--gpu-points", type=int, default=5_000_000)
    args = parser.parse_args()

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {W}x{H}, {args.points:,} points")
    points, colors = make_cloud(args.points)
    c2w, k = camera_path(args.frames)
    projections = projection_matrices(c2w, k)

    # Ours: points stored as rows, as PointMemory stores them.
    rows_points = points.T.contiguous().T
    renderer = PointRenderer(W, H, splat_radius_px=1)
    renderer.render(rows_points, colors, c2w[:1], k[:1])  # warm-up
    ours = time_frames(lambda i: renderer.render(rows_points, colors, c2w[i : i + 1], k[i : i + 1]), args.frames)
    coverage = float(renderer.render(rows_points, colors, c2w[:1], k[:1]).mask.float().mean())
    ours_ms = 1e3 * statistics.median(ours)
    print(f"ours (torch packed-key z-buffer, 3x3 splats): median {ours_ms:.1f} ms/frame, coverage {coverage:.3f}")

    scatter_baseline(points, colors, projections[0])
    base = time_frames(lambda i: scatter_baseline(points, colors, projections[i]), args.frames)
    base_ms = 1e3 * statistics.median(base)
    print(f"plain torch scatter_reduce z-buffer (1 px): median {base_ms:.1f} ms/frame")

    o3d_ms = None
    try:
        import open3d as o3d
    except Exception as exc:  # ImportError, or a missing system library (libusb-1.0-0)
        print(f"open3d: not available ({type(exc).__name__}: {exc}); comparison skipped")
    else:
        pcd = o3d.t.geometry.PointCloud(o3d.core.Tensor(points.numpy()))
        pcd.point.colors = o3d.core.Tensor(colors.numpy().astype(np.float32) / 255.0)
        c2w64 = c2w.double().numpy()

        def o3d_frame(i: int):
            kk = k[i].double().numpy()
            intr = o3d.core.Tensor(np.array([[kk[0], 0, kk[2]], [0, kk[1], kk[3]], [0, 0, 1]]))
            extr = o3d.core.Tensor(np.linalg.inv(c2w64[i]))
            return pcd.project_to_rgbd_image(W, H, intr, extr, depth_scale=1.0, depth_max=100.0)

        o3d_frame(0)
        o3d_times = time_frames(o3d_frame, args.frames)
        o3d_ms = 1e3 * statistics.median(o3d_times)
        print(f"open3d {o3d.__version__} t.PointCloud.project_to_rgbd_image (1 px): median {o3d_ms:.1f} ms/frame")

    gpu_text = "gpu=absent"
    if torch.cuda.is_available():
        device = torch.device("cuda")
        g_points, g_colors = make_cloud(args.gpu_points, seed=1)
        g_points = g_points.T.contiguous().T.to(device)
        g_colors = g_colors.to(device)
        g_renderer = PointRenderer(W, H, splat_radius_px=1)
        for i in range(3):
            g_renderer.render(g_points, g_colors, c2w[i : i + 1], k[i : i + 1])
        gpu = time_frames(
            lambda i: g_renderer.render(g_points, g_colors, c2w[i : i + 1], k[i : i + 1]),
            args.frames,
            sync=torch.cuda.synchronize,
        )
        gpu_ms = 1e3 * statistics.median(gpu)
        name = torch.cuda.get_device_name(device)
        print(f"GPU {name}: {args.gpu_points:,} points, median {gpu_ms:.2f} ms/frame = {1e3 / gpu_ms:.0f} fps")
        gpu_text = f"gpu_points={args.gpu_points} gpu_fps={1e3 / gpu_ms:.0f}"
    else:
        print(f"GPU: no CUDA device present; the {args.gpu_points:,}-point GPU figure was not measured")

    o3d_text = f"open3d_ms={o3d_ms:.1f} speedup_vs_open3d={o3d_ms / ours_ms:.2f}" if o3d_ms else "speedup_vs_open3d=n/a"
    print(
        f"RESULT median_ms={ours_ms:.1f} scatter_ms={base_ms:.1f} speedup_vs_scatter={base_ms / ours_ms:.2f} "
        f"{o3d_text} points={args.points} {gpu_text}"
    )


if __name__ == "__main__":
    main()
