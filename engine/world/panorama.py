"""Equirectangular panoramas in the memory: lifting a panorama along its rays, and its cube faces.

The panorama convention (which column is heading 0, which way is up, depth as distance along the ray) is
``bridge/panorama.py``'s; this module only applies it.

- :func:`lift_panorama`: every pixel with a distance becomes a point at ``c2w @ (ray * distance)``, so a 360-degree
  reference is one memory that any perspective camera inside it renders from.
- Cube faces (:data:`CUBE_FACES`, :func:`face_camera`, :func:`equirect_to_face`): perspective views of the panorama
  with a chosen field of view (more than 90 degrees gives neighbouring faces an overlap), for a depth network that
  sees pinhole images only.
- :func:`panorama_distance_from_faces`: per-face depth estimates mapped back into the panorama and aligned to one
  another on their overlaps (scale and shift, with ``depth_alignment.robust_line_fit``), so faces estimated at
  different scales become one consistent 360-degree depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ...bridge import panorama as pano
from .depth_alignment import robust_line_fit

#: The six cube faces in the order they are aligned (each after one it overlaps): name -> (heading, pitch) in
#: degrees; heading positive to the camera's right, pitch positive up.
CUBE_FACES = {"front": (0.0, 0.0), "right": (90.0, 0.0), "back": (180.0, 0.0), "left": (270.0, 0.0),
              "up": (0.0, 90.0), "down": (0.0, -90.0)}
#: Field of view of the faces a depth network sees: 10 degrees more than a cube's, so each face overlaps its
#: neighbours by 5 degrees on every side to align on.
FACE_FOV_DEG = 100.0
#: Fewest overlap pixels a face is aligned on; with fewer, it keeps the scale it was estimated at.
MIN_OVERLAP_PIXELS = 64


def face_rotation_opencv(heading_deg: float, pitch_deg: float) -> np.ndarray:
    """(3, 3) rotation from a face camera's OpenCV frame to the panorama camera's: yaw about y (down), then pitch."""
    h, p = math.radians(heading_deg), math.radians(pitch_deg)
    yaw = np.array([[math.cos(h), 0.0, math.sin(h)], [0.0, 1.0, 0.0], [-math.sin(h), 0.0, math.cos(h)]])
    pitch = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(p), -math.sin(p)], [0.0, math.sin(p), math.cos(p)]])
    return yaw @ pitch


def face_intrinsics(size: int, fov_deg: float) -> np.ndarray:
    """(4,) fx, fy, cx, cy of a square ``size`` px face with a horizontal (and vertical) field of view ``fov_deg``."""
    f = size / 2.0 / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([f, f, size / 2.0, size / 2.0])


def face_size(pano_width: int, fov_deg: float = FACE_FOV_DEG) -> int:
    """A face's side in px that keeps the panorama's angular resolution at the face's centre."""
    f = pano_width / (2.0 * math.pi)
    return max(int(round(2.0 * f * math.tan(math.radians(fov_deg) / 2.0))), 16)


def face_camera(c2w_opencv: torch.Tensor, face: str) -> torch.Tensor:
    """(4, 4) camera-to-world (OpenCV) of cube face ``face`` of a panorama whose camera is ``c2w_opencv``."""
    rot = torch.eye(4, dtype=c2w_opencv.dtype, device=c2w_opencv.device)
    rot[:3, :3] = torch.as_tensor(face_rotation_opencv(*CUBE_FACES[face]), dtype=c2w_opencv.dtype, device=c2w_opencv.device)
    return c2w_opencv @ rot


def _face_rays(size: int, k: np.ndarray) -> np.ndarray:
    """(S, S, 3) rays of the face's pixel centres in its OpenCV frame, z = 1."""
    u = (np.arange(size) + 0.5 - k[2]) / k[0]
    v = (np.arange(size) + 0.5 - k[3]) / k[1]
    return np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((1, 1))), -1)


def equirect_to_face(image: np.ndarray, face: str, size: int, fov_deg: float = FACE_FOV_DEG, nearest: bool = False) -> np.ndarray:
    """The perspective view of cube face ``face`` of a panorama: (H, W[, C]) -> (S, S[, C]), resampled with OpenCV."""
    import cv2

    height, width = image.shape[:2]
    rays = _face_rays(size, face_intrinsics(size, fov_deg)) @ face_rotation_opencv(*CUBE_FACES[face]).T
    lon, lat = pano.ray_opencv_to_lonlat(rays)
    u, v = pano.lonlat_to_equirect_uv(lon, lat, width, height)
    # One wrapped column on each side, so headings at the seam interpolate across it; cv2.remap's pixel
    # index i has its centre at i, ours at i + 0.5.
    padded = np.concatenate([image[:, -1:], image, image[:, :1]], axis=1)
    map_x = (u - 0.5 + 1.0).astype(np.float32)
    map_y = np.clip(v - 0.5, 0.0, height - 1.0).astype(np.float32)
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.remap(np.ascontiguousarray(padded), map_x, map_y, mode, borderMode=cv2.BORDER_REPLICATE)


def face_to_equirect(depth_z_m: np.ndarray, face: str, width: int, height: int, fov_deg: float = FACE_FOV_DEG
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A face's z-depth (S, S) as panorama distances: (H, W) distance_m, (H, W) bool covered, (H, W) centrality.

    Nearest face pixel per panorama pixel; distance = z-depth / (the unit ray's z in the face's frame).
    ``centrality`` is that z (1 at the face's centre), to prefer the face a pixel is most central in.
    """
    size = depth_z_m.shape[0]
    k = face_intrinsics(size, fov_deg)
    rays_face = pano.equirect_rays_opencv(width, height) @ face_rotation_opencv(*CUBE_FACES[face])
    z = rays_face[..., 2]
    ahead = z > 1e-6
    safe_z = np.where(ahead, z, 1.0)
    u = k[0] * rays_face[..., 0] / safe_z + k[2]
    v = k[1] * rays_face[..., 1] / safe_z + k[3]
    covered = ahead & (u >= 0) & (u < size) & (v >= 0) & (v < size)
    col = np.clip(np.floor(u).astype(np.int64), 0, size - 1)
    row = np.clip(np.floor(v).astype(np.int64), 0, size - 1)
    depth = depth_z_m[row, col]
    covered &= np.isfinite(depth) & (depth > 0)
    distance = np.where(covered, depth / safe_z, 0.0)
    return distance.astype(np.float32), covered, np.where(covered, z, 0.0)


@dataclass(frozen=True)
class FaceFit:
    """How one cube face's depth was aligned to the faces before it: ``distance ~ scale * estimate + shift``."""

    face: str
    scale: float
    shift: float
    overlap: int  # panorama pixels it was fitted on (0: the first face, or too little overlap)


#: A face's depth: (S, S, 3) uint8 face image and (4,) fx, fy, cx, cy -> (S, S) z-depth in metres and confidence.
FaceDepth = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def panorama_distance_from_faces(rgb: np.ndarray, face_depth: FaceDepth, fov_deg: float = FACE_FOV_DEG,
                                 size: int | None = None) -> tuple[np.ndarray, np.ndarray, list[FaceFit]]:
    """Distance along the rays of a whole panorama from per-face depth estimates aligned to one another.

    rgb: (H, W, 3) uint8 panorama. Each face of :data:`CUBE_FACES` (``fov_deg`` wide, ``size`` px, default
    :func:`face_size`) is estimated by ``face_depth``, mapped into the panorama, and fitted (robust scale and
    shift) to the faces already placed where they overlap; the first face sets the scale. Each panorama pixel
    then takes the aligned face it is most central in. Returns (H, W) distance_m, (H, W) confidence, the fits.
    """
    height, width = rgb.shape[:2]
    size = size or face_size(width, fov_deg)
    placed = np.zeros((height, width), dtype=np.float64)
    placed_mask = np.zeros((height, width), dtype=bool)
    best_distance = np.zeros((height, width), dtype=np.float32)
    best_confidence = np.zeros((height, width), dtype=np.float32)
    best_centrality = np.zeros((height, width), dtype=np.float64)
    fits: list[FaceFit] = []
    k = face_intrinsics(size, fov_deg)
    for face in CUBE_FACES:
        image = equirect_to_face(rgb, face, size, fov_deg)
        depth_z, confidence = face_depth(image, k)
        distance, covered, centrality = face_to_equirect(np.asarray(depth_z, dtype=np.float32), face, width, height, fov_deg)
        conf_pano, _, _ = face_to_equirect(np.broadcast_to(np.asarray(confidence, dtype=np.float32) + 1e-6, depth_z.shape).copy(),
                                           face, width, height, fov_deg)
        overlap = covered & placed_mask
        scale, shift, used = 1.0, 0.0, 0
        if fits and int(overlap.sum()) >= MIN_OVERLAP_PIXELS:
            x = torch.from_numpy(distance[overlap].astype(np.float64))
            y = torch.from_numpy(placed[overlap])
            line = robust_line_fit(x, y)
            scale, shift, used = line.slope, line.intercept, int(overlap.sum())
            if not scale > 0:  # a degenerate overlap (one flat wall seen edge-on): a scale through the origin
                line = robust_line_fit(torch.log(x.clamp_min(1e-6)), torch.log(y.clamp_min(1e-6)), fit_slope=False)
                scale, shift = math.exp(line.intercept), 0.0
        aligned = np.where(covered, scale * distance + shift, 0.0)
        covered &= aligned > 0
        fits.append(FaceFit(face, float(scale), float(shift), used))
        placed = np.where(covered & ~placed_mask, aligned, placed)
        placed_mask |= covered
        better = covered & (centrality > best_centrality)
        best_distance = np.where(better, aligned, best_distance).astype(np.float32)
        best_confidence = np.where(better, conf_pano, best_confidence).astype(np.float32)
        best_centrality = np.where(better, centrality, best_centrality)
    return best_distance, best_confidence, fits


def panorama_points(distance_m: torch.Tensor, c2w_opencv: torch.Tensor, where: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World points (M, 3) of the panorama pixels with a distance (and ``where``), with their rows and columns."""
    height, width = distance_m.shape
    device = distance_m.device
    valid = torch.isfinite(distance_m) & (distance_m > 0)
    if where is not None:
        valid &= where.to(device)
    rows, cols = torch.nonzero(valid, as_tuple=True)
    rays = torch.from_numpy(pano.equirect_rays_opencv(width, height)).to(device, torch.float64)[rows, cols]
    c2w = c2w_opencv.to(device, torch.float64)
    points = (rays * distance_m[rows, cols, None].to(torch.float64)) @ c2w[:3, :3].T + c2w[:3, 3]
    return points.to(torch.float32), rows, cols


def lift_panorama(memory, rgb: torch.Tensor, distance_m: torch.Tensor, c2w_opencv: torch.Tensor, frame_index: int = 0,
                  confidence: float | torch.Tensor = 1.0, where: torch.Tensor | None = None) -> int:
    """Add a panorama to a :class:`~.memory.PointMemory`: rgb (H, W, 3) uint8, distance_m (H, W) metres along each
    pixel's ray (0 = none), c2w_opencv (4, 4) of the panorama's camera; confidence a float or (H, W). Returns the count."""
    points, rows, cols = panorama_points(distance_m.to(memory.device), c2w_opencv, where)
    conf = torch.as_tensor(confidence, dtype=torch.float32, device=memory.device)
    if conf.dim() == 2:
        conf = conf[rows, cols]
    memory.add_points(points, rgb.to(memory.device)[rows, cols], frame_index, conf)
    memory.enforce_budget()
    return int(rows.numel())
