"""A scene with known geometry (axis-aligned boxes; thin boxes are planes), ray-cast to RGB-D.

Used by the tests (accuracy against exact geometry, retrieval with known
answers), by the benchmarks and as a reference image for demos without
Blender. World is Blender's (Z up, metres); cameras are camera-to-world in
OpenCV axes; depth is z-depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..world.cameras import pixel_centres


@dataclass(frozen=True)
class Box:
    """An axis-aligned box from ``lo`` to ``hi`` (metres), base colour RGB 0-255, checker size in metres."""

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    color: tuple[int, int, int]
    checker_m: float = 0.5


@dataclass(frozen=True)
class Scene:
    boxes: tuple[Box, ...] = field(default_factory=tuple)

    @property
    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.tensor([b.lo for b in self.boxes], dtype=torch.float64).min(0).values
        hi = torch.tensor([b.hi for b in self.boxes], dtype=torch.float64).max(0).values
        return lo, hi

    @property
    def size_m(self) -> float:
        """The diagonal of the scene's bounding box."""
        lo, hi = self.bounds
        return float((hi - lo).norm())

    def distance_to_surface(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) distance to the nearest box surface (min over boxes of |signed distance|)."""
        p = points.to(torch.float64)
        best = torch.full((p.shape[0],), float("inf"), dtype=torch.float64)
        for box in self.boxes:
            lo = torch.tensor(box.lo, dtype=torch.float64)
            hi = torch.tensor(box.hi, dtype=torch.float64)
            centre, half = (lo + hi) / 2, (hi - lo) / 2
            q = (p - centre).abs() - half
            outside = q.clamp_min(0).norm(dim=1)
            inside = q.max(dim=1).values.clamp_max(0)
            best = torch.minimum(best, (outside + inside).abs())
        return best


def demo_scene() -> Scene:
    """A room corner: floor, two walls, three boxes of different sizes and colours (about 10 m across)."""
    return Scene(
        boxes=(
            Box((-5.0, -5.0, -0.1), (5.0, 5.0, 0.0), (170, 160, 140), 1.0),  # floor
            Box((-5.0, 5.0, 0.0), (5.0, 5.1, 3.0), (90, 120, 170), 0.75),  # back wall
            Box((-5.1, -5.0, 0.0), (-5.0, 5.0, 3.0), (150, 90, 80), 0.75),  # left wall
            Box((-1.0, 1.0, 0.0), (0.5, 2.5, 1.2), (200, 60, 50), 0.3),
            Box((1.5, 0.0, 0.0), (2.5, 1.0, 2.0), (60, 170, 80), 0.25),
            Box((-3.0, -1.0, 0.0), (-2.2, -0.2, 0.6), (220, 200, 60), 0.2),
        )
    )


def look_at_c2w_opencv(eye, target, up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """Camera-to-world (4, 4) float64 in OpenCV axes for a camera at ``eye`` looking at ``target`` (world Z up)."""
    eye = torch.as_tensor(eye, dtype=torch.float64)
    target = torch.as_tensor(target, dtype=torch.float64)
    up = torch.as_tensor(up, dtype=torch.float64)
    forward = target - eye
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, up)
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, eye
    return c2w


def intrinsics_for_fov(width: int, height: int, horizontal_fov_deg: float) -> torch.Tensor:
    """(4,) fx, fy, cx, cy for square pixels and a centred principal point."""
    fx = (width / 2) / torch.tan(torch.deg2rad(torch.tensor(horizontal_fov_deg, dtype=torch.float64)) / 2)
    return torch.tensor([float(fx), float(fx), width / 2, height / 2], dtype=torch.float64)


def raycast(
    scene: Scene,
    c2w_opencv: torch.Tensor,
    intrinsics: torch.Tensor,
    width: int,
    height: int,
    pixel_offset: tuple[float, float] = (0.5, 0.5),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray-cast the scene: ((H, W, 3) uint8 RGB, (H, W) float32 z-depth, 0 where no hit).

    Rays go through ``(col + pixel_offset[0], row + pixel_offset[1])``: pixel
    centres by default; other offsets sample the surfaces between them.
    """
    fx, fy, cx, cy = (float(x) for x in intrinsics.tolist())
    u, v = pixel_centres(width, height)
    u = u.to(torch.float64) - 0.5 + pixel_offset[0]
    v = v.to(torch.float64) - 0.5 + pixel_offset[1]
    # Camera ray with unit z: the ray parameter t is the z-depth itself.
    d_cam = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u)], dim=-1).reshape(-1, 3)
    c2w = c2w_opencv.to(torch.float64)
    d = d_cam @ c2w[:3, :3].T
    o = c2w[:3, 3]
    best_t = torch.full((d.shape[0],), float("inf"), dtype=torch.float64)
    best_box = torch.full((d.shape[0],), -1, dtype=torch.int64)
    with torch.no_grad():
        inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        for i, box in enumerate(scene.boxes):
            lo = torch.tensor(box.lo, dtype=torch.float64)
            hi = torch.tensor(box.hi, dtype=torch.float64)
            t0 = (lo - o) * inv
            t1 = (hi - o) * inv
            t_near = torch.minimum(t0, t1).max(dim=1).values
            t_far = torch.maximum(t0, t1).min(dim=1).values
            hit = (t_near <= t_far) & (t_near > 1e-6) & (t_near < best_t)
            best_t = torch.where(hit, t_near, best_t)
            best_box = torch.where(hit, torch.full_like(best_box, i), best_box)
    found = best_box >= 0
    depth = torch.where(found, best_t, torch.zeros_like(best_t))
    points = o + d * depth[:, None]
    rgb = torch.zeros(d.shape[0], 3, dtype=torch.float64)
    for i, box in enumerate(scene.boxes):
        sel = best_box == i
        if not bool(sel.any()):
            continue
        cell = torch.floor(points[sel] / box.checker_m + 1e-6).to(torch.int64).sum(dim=1) % 2
        base = torch.tensor(box.color, dtype=torch.float64)
        # A smooth ramp on top of the checker so no two places look exactly alike.
        ramp = 0.15 * torch.sin(points[sel] @ torch.tensor([1.3, 0.7, 2.1], dtype=torch.float64))
        shade = (0.75 + 0.25 * cell.to(torch.float64) + ramp)[:, None]
        rgb[sel] = (base * shade).clamp(0, 255)
    rgb = rgb.round().to(torch.uint8).reshape(height, width, 3)
    return rgb, depth.to(torch.float32).reshape(height, width)
