"""Camera maths in torch: the twins of ``bridge/cameras.py`` (which owns the conventions, in numpy).

Every torch function that projects, unprojects, inverts a camera or rescales
intrinsics lives here, so the memory, its renderer, retrieval, the runner and
the pipelines share one implementation (tests hold them equal to the bridge's).

Conventions (DESIGN.md): camera-to-world matrices in OpenCV axes (x right,
y down, z forward); intrinsics ``(fx, fy, cx, cy)`` in pixels; continuous pixel
coordinates, so pixel ``(col i, row j)`` has its centre at ``(i + 0.5, j + 0.5)``;
depth is z-depth in metres.
"""

from __future__ import annotations

import torch

from ...bridge.cameras import c2w_to_w2c


def pixel_centres(width: int, height: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) float32 ``u`` (column) and ``v`` (row) pixel-centre coordinates."""
    u = torch.arange(width, dtype=torch.float32, device=device) + 0.5
    v = torch.arange(height, dtype=torch.float32, device=device) + 0.5
    return u[None, :].expand(height, width), v[:, None].expand(height, width)


def unproject_depth(
    depth_z_m: torch.Tensor,
    c2w_opencv: torch.Tensor,
    intrinsics: torch.Tensor,
) -> torch.Tensor:
    """Lift a z-depth map to world points at the pixel centres.

    depth_z_m: (H, W) z-depth in metres. c2w_opencv: (4, 4). intrinsics: (4,) fx, fy, cx, cy.
    Returns (H, W, 3) float32 world positions (meaningless where depth is 0).
    """
    height, width = depth_z_m.shape
    device = depth_z_m.device
    fx, fy, cx, cy = (float(x) for x in intrinsics.tolist())
    u, v = pixel_centres(width, height, device)
    z = depth_z_m.to(torch.float32)
    cam = torch.stack([(u - cx) / fx * z, (v - cy) / fy * z, z], dim=-1)  # (H, W, 3) camera, OpenCV
    c2w = c2w_opencv.to(device=device, dtype=torch.float64)
    rot = c2w[:3, :3].to(torch.float32)
    trans = c2w[:3, 3].to(torch.float32)
    return cam @ rot.T + trans


def unproject_pixels(
    rows: torch.Tensor,
    cols: torch.Tensor,
    depth_z_m: torch.Tensor,
    c2w_opencv: torch.Tensor,
    intrinsics: torch.Tensor,
) -> torch.Tensor:
    """World points at the centres of pixels (row, col) with z-depths: (P,) each -> (P, 3) float32."""
    fx, fy, cx, cy = (float(x) for x in intrinsics.tolist())
    z = depth_z_m.to(torch.float32)
    x = (cols.to(torch.float32) + (0.5 - cx)) * (z / fx)
    y = (rows.to(torch.float32) + (0.5 - cy)) * (z / fy)
    cam = torch.stack([x, y, z], dim=-1)
    c2w = c2w_opencv.to(device=z.device, dtype=torch.float32)
    return torch.addmm(c2w[:3, 3], cam, c2w[:3, :3].T)


def world_to_camera(points_world: torch.Tensor, c2w_opencv: torch.Tensor) -> torch.Tensor:
    """(N, 3) world points -> (N, 3) camera-frame points (OpenCV axes)."""
    c2w = c2w_opencv.to(torch.float64)
    rot = c2w[:3, :3]
    trans = c2w[:3, 3]
    cam = (points_world.to(torch.float64) - trans.to(points_world.device)) @ rot.to(points_world.device)
    return cam.to(torch.float32)


def project_camera_points(points_cam: torch.Tensor, intrinsics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3) camera points -> ((N, 2) continuous pixel coordinates, (N,) z-depth)."""
    fx, fy, cx, cy = (float(x) for x in intrinsics.tolist())
    z = points_cam[:, 2]
    safe = torch.where(z.abs() > 1e-12, z, torch.full_like(z, 1e-12))
    uv = torch.stack([fx * points_cam[:, 0] / safe + cx, fy * points_cam[:, 1] / safe + cy], dim=-1)
    return uv, z


def camera_centres(c2w_opencv: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) -> (B, 3) camera positions in the world."""
    return c2w_opencv[:, :3, 3]


def rotation_angle_between(rot_a: torch.Tensor, rot_b: torch.Tensor) -> torch.Tensor:
    """Geodesic angle in radians between rotation matrices (..., 3, 3) (broadcasting)."""
    rel = rot_a.transpose(-1, -2) @ rot_b
    trace = rel.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.arccos(((trace - 1.0) / 2.0).clamp(-1.0, 1.0))

def intrinsics_matrices(intrinsics: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(N, 4)`` ``fx, fy, cx, cy`` -> ``(N, 3, 3)`` pixel matrices (``dtype``, float32 by default)."""
    intr = torch.as_tensor(intrinsics).to(dtype)
    k = torch.zeros(intr.shape[0], 3, 3, dtype=dtype, device=intr.device)
    k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2] = intr.unbind(-1)
    k[:, 2, 2] = 1.0
    return k


def rescale_intrinsics(k: torch.Tensor, from_wh: tuple[int, int], to_wh: tuple[int, int]) -> torch.Tensor:
    """``(N, 3, 3)`` pixel intrinsics at ``from_wh`` -> at ``to_wh``: row 0 times ``W / w``, row 1 times ``H / h``."""
    k = k.clone()
    k[:, 0, :] = k[:, 0, :] / from_wh[0] * to_wh[0]
    k[:, 1, :] = k[:, 1, :] / from_wh[1] * to_wh[1]
    return k


def rescale_intrinsics_vec(intrinsics: torch.Tensor, from_wh: tuple[int, int], to_wh: tuple[int, int]) -> torch.Tensor:
    """The same for ``(N, 4)`` ``fx, fy, cx, cy``."""
    sx, sy = to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]
    return intrinsics * torch.tensor([sx, sy, sx, sy], dtype=intrinsics.dtype, device=intrinsics.device)


def w2c_from_c2w_opencv(c2w_opencv: torch.Tensor) -> torch.Tensor:
    """``(N, 4, 4)`` camera-to-world (OpenCV) -> world-to-camera float32 (the bridge's conversion)."""
    return torch.from_numpy(c2w_to_w2c(torch.as_tensor(c2w_opencv).detach().cpu().double().numpy())).float()


def projection_matrices(c2w_opencv: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """World-to-pixel projection ``K [R^T | -R^T t]`` for each camera.

    c2w_opencv: (B, 4, 4) camera-to-world, OpenCV axes.
    intrinsics: (B, 4) ``fx, fy, cx, cy`` in pixels.
    Returns (B, 3, 4) float64: ``P @ [X, 1]`` is ``(u z, v z, z)`` with ``u, v``
    continuous pixel coordinates and ``z`` the z-depth.
    """
    c2w = c2w_opencv.to(torch.float64)
    rot_t = c2w[:, :3, :3].transpose(1, 2)
    w2c = torch.cat([rot_t, -rot_t @ c2w[:, :3, 3:]], dim=2)  # (B, 3, 4), the rigid inverse
    return intrinsics_matrices(intrinsics, torch.float64) @ w2c
