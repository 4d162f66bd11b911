"""Equirectangular panoramas: the one place that says how a panorama's pixels map to rays.

Convention (``equirectangular``, what ``reference.projection`` names):

- The panorama is W x H with W = 2 H (``is_equirectangular_size`` allows 1% either way). Pixel coordinates are
  continuous as everywhere in the project: the image spans [0, W] x [0, H], the top-left pixel's centre is
  (0.5, 0.5).
- Longitude (heading) ``lon = (u / W - 1/2) * 2 pi``: the image's centre column is heading 0, the camera's forward
  (+z of its OpenCV frame); heading grows to the right, so u = 3W/4 is the camera's right (+x) and the left and
  right edges are the camera's back. Latitude ``lat = (1/2 - v / H) * pi``: the top row is up (the camera's -y),
  the bottom row down (+y).
- The ray of (lon, lat) in the camera's OpenCV frame is ``(cos lat sin lon, -sin lat, cos lat cos lon)``, unit length.
- A panorama's depth is the distance along that ray in metres (``distance_m``), not z-depth: z-depth is undefined
  behind the camera. 0 (or non-finite) means no surface there (the far backdrop).

This is Blender's own layout: Cycles' equirectangular camera looks along the camera's view direction at the image's
centre, with up at the top, and its Depth pass for panoramic cameras is the distance along the ray (the add-on's
render, ``addon/reference.py``, relies on both; its test checks them with the real Blender).

The panorama's camera (its pose) is the reference frame's camera of the job; its pinhole intrinsics play no part.
"""

from __future__ import annotations

import math

import numpy as np

PERSPECTIVE = "perspective"
EQUIRECTANGULAR = "equirectangular"
#: What ``reference.projection`` may be; perspective is the default.
PROJECTIONS = (PERSPECTIVE, EQUIRECTANGULAR)
#: How far from exactly 2:1 a panorama may be (relative), so odd sizes such as 8192x4095 still count.
EQUIRECT_ASPECT_TOLERANCE = 0.01


def is_equirectangular_size(width: int, height: int) -> bool:
    """Whether an image of ``width`` x ``height`` px has a panorama's 2:1 shape (within 1%)."""
    return height > 0 and abs(width / height - 2.0) <= 2.0 * EQUIRECT_ASPECT_TOLERANCE


def equirect_uv_to_lonlat(u: np.ndarray, v: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous pixel coordinates (any shape) to longitude and latitude in radians (see the module docstring)."""
    lon = (np.asarray(u, dtype=np.float64) / width - 0.5) * 2.0 * math.pi
    lat = (0.5 - np.asarray(v, dtype=np.float64) / height) * math.pi
    return lon, lat


def lonlat_to_ray_opencv(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Unit rays ``(..., 3)`` in the camera's OpenCV frame (x right, y down, z forward) for longitude/latitude."""
    cos_lat = np.cos(lat)
    return np.stack([cos_lat * np.sin(lon), -np.sin(lat), cos_lat * np.cos(lon)], axis=-1)


def ray_opencv_to_lonlat(rays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rays ``(..., 3)`` in the camera's OpenCV frame (any length) to longitude in (-pi, pi] and latitude."""
    rays = np.asarray(rays, dtype=np.float64)
    x, y, z = rays[..., 0], rays[..., 1], rays[..., 2]
    return np.arctan2(x, z), np.arctan2(-y, np.hypot(x, z))


def lonlat_to_equirect_uv(lon: np.ndarray, lat: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Longitude/latitude in radians to continuous pixel coordinates (u in [0, W), wrapped)."""
    u = np.mod(np.asarray(lon) / (2.0 * math.pi) + 0.5, 1.0) * width
    v = (0.5 - np.asarray(lat) / math.pi) * height
    return u, v


def equirect_rays_opencv(width: int, height: int) -> np.ndarray:
    """(H, W, 3) float64 unit rays of every pixel centre of a W x H panorama, in the camera's OpenCV frame."""
    u = np.arange(width, dtype=np.float64) + 0.5
    v = np.arange(height, dtype=np.float64) + 0.5
    lon, lat = equirect_uv_to_lonlat(u[None, :], v[:, None], width, height)
    return lonlat_to_ray_opencv(np.broadcast_to(lon, (height, width)), np.broadcast_to(lat, (height, width)))


def heading_column(heading_rad: float, width: int) -> float:
    """The continuous column u of a heading (radians, 0 = the camera's forward, positive to its right)."""
    u, _ = lonlat_to_equirect_uv(np.asarray(heading_rad), np.asarray(0.0), width, 2)
    return float(u)
