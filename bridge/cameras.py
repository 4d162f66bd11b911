"""Camera conventions: the one module where axes, directions and intrinsics are converted.

Conventions (see DESIGN.md):

- World: Blender world coordinates, right-handed, Z up, metres.
- ``opencv`` camera frame: x right, y down, z forward (the protocol's frame).
- ``blender`` camera frame: x right, y up, looks down -z (also OpenGL's and
  nerfstudio's camera frame).
- ``c2w`` matrices map camera coordinates to world coordinates; ``w2c`` is
  the inverse (what the upstream WorldStereo model and COLMAP store).
- Intrinsics are in pixels of the output resolution. Pixel coordinates are
  continuous: the image spans [0, W] x [0, H] with the top-left pixel's centre
  at (0.5, 0.5), so an unshifted camera has cx = W / 2, cy = H / 2.
- Depth is z-depth along the camera's forward axis in metres.

Everything here is a pure function of numbers (numpy arrays); nothing imports
bpy. Matrices broadcast over leading batch dimensions: shapes are ``(..., 4, 4)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import KeyframeWorldsError

# diag(1, -1, -1): flips y and z between the Blender (OpenGL) and OpenCV camera frames.
# It is its own inverse, so it serves both directions.
_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])

SENSOR_FITS = ("AUTO", "HORIZONTAL", "VERTICAL")


# --- extrinsics -------------------------------------------------------------


def c2w_blender_to_opencv(c2w_blender: np.ndarray) -> np.ndarray:
    """Camera-to-world with a Blender camera frame -> with an OpenCV camera frame. ``(..., 4, 4)``."""
    return np.asarray(c2w_blender, dtype=np.float64) @ _FLIP_YZ


def c2w_opencv_to_blender(c2w_opencv: np.ndarray) -> np.ndarray:
    """Camera-to-world with an OpenCV camera frame -> with a Blender camera frame. ``(..., 4, 4)``."""
    return np.asarray(c2w_opencv, dtype=np.float64) @ _FLIP_YZ


# nerfstudio's transform_matrix uses the OpenGL camera frame, which is Blender's.
c2w_opencv_to_nerfstudio = c2w_opencv_to_blender
c2w_nerfstudio_to_opencv = c2w_blender_to_opencv


def invert_rigid(m: np.ndarray) -> np.ndarray:
    """Inverse of rigid 4x4 transforms (rotation + translation), exact for orthonormal R. ``(..., 4, 4)``."""
    m = np.asarray(m, dtype=np.float64)
    r = m[..., :3, :3]
    t = m[..., :3, 3:]
    out = np.zeros_like(m)
    rt = np.swapaxes(r, -1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3:] = -rt @ t
    out[..., 3, 3] = 1.0
    return out


def c2w_to_w2c(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world -> world-to-camera (same camera frame). ``(..., 4, 4)``.

    A full matrix inverse rather than the rigid transpose: matrices read from
    files (float32 upstream) are orthonormal only to ~1e-7, and the general
    inverse keeps the round trip file -> c2w -> file exact to rounding.
    """
    return np.linalg.inv(np.asarray(c2w, dtype=np.float64))


def w2c_to_c2w(w2c: np.ndarray) -> np.ndarray:
    """World-to-camera -> camera-to-world (same camera frame). ``(..., 4, 4)``. See ``c2w_to_w2c``."""
    return np.linalg.inv(np.asarray(w2c, dtype=np.float64))


def split_scale(matrix_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split an affine 4x4 (rotation, translation, scale) into a rigid 4x4 and its per-axis scale.

    Returns ``(rigid, scale)`` with ``rigid`` of shape ``(..., 4, 4)`` and
    ``scale`` of shape ``(..., 3)`` (lengths of the basis columns). Shear is
    not expected in camera matrices; it is not removed exactly.
    """
    m = np.asarray(matrix_world, dtype=np.float64)
    basis = m[..., :3, :3]
    scale = np.linalg.norm(basis, axis=-2)
    if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
        raise KeyframeWorldsError("camera matrix has a zero or non-finite scale")
    rigid = m.copy()
    rigid[..., :3, :3] = basis / scale[..., None, :]
    rigid[..., 3, :] = (0.0, 0.0, 0.0, 1.0)
    return rigid, scale


# --- rotations as quaternions (COLMAP: qw qx qy qz, Hamilton, rotating world to camera) ----------


def rotation_to_quaternion_wxyz(r: np.ndarray) -> np.ndarray:
    """3x3 rotation -> unit quaternion (w, x, y, z) with w >= 0. ``(..., 3, 3) -> (..., 4)``."""
    r = np.asarray(r, dtype=np.float64)
    batch = r.shape[:-2]
    r = r.reshape(-1, 3, 3)
    q = np.empty((r.shape[0], 4))
    for i, m in enumerate(r):
        tr = m[0, 0] + m[1, 1] + m[2, 2]
        # Branch on the largest diagonal term for numerical stability.
        if tr > 0:
            s = 2.0 * np.sqrt(tr + 1.0)
            q[i] = (0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s)
        elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
            s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
            q[i] = ((m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s)
        elif m[1, 1] > m[2, 2]:
            s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
            q[i] = ((m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s)
        else:
            s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
            q[i] = ((m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    q[q[:, 0] < 0] *= -1.0
    return q.reshape(*batch, 4)


def quaternion_wxyz_to_rotation(q: np.ndarray) -> np.ndarray:
    """Quaternion (w, x, y, z), normalised here -> 3x3 rotation. ``(..., 4) -> (..., 3, 3)``."""
    q = np.asarray(q, dtype=np.float64)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(norm == 0) or not np.all(np.isfinite(norm)):
        raise KeyframeWorldsError("quaternion has zero or non-finite length")
    w, x, y, z = np.moveaxis(q / norm, -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


# --- intrinsics -------------------------------------------------------------


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels of a ``width`` x ``height`` image (continuous pixel coordinates)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def matrix(self) -> np.ndarray:
        """The 3x3 K matrix ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``."""
        return intrinsics_matrix(self.fx, self.fy, self.cx, self.cy)

    def scaled_to(self, width: int, height: int) -> "Intrinsics":
        """The same camera at another resolution (image stretched to fill it)."""
        sx, sy = width / self.width, height / self.height
        return Intrinsics(self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, int(width), int(height))


def intrinsics_matrix(fx, fy, cx, cy) -> np.ndarray:
    """K matrices from arrays (or scalars) of fx, fy, cx, cy. Returns ``(..., 3, 3)``."""
    fx, fy, cx, cy = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (fx, fy, cx, cy)))
    k = np.zeros(fx.shape + (3, 3))
    k[..., 0, 0] = fx
    k[..., 1, 1] = fy
    k[..., 0, 2] = cx
    k[..., 1, 2] = cy
    k[..., 2, 2] = 1.0
    return k


def render_resolution(resolution_x: int, resolution_y: int, resolution_percentage: int) -> tuple[int, int]:
    """Output size in pixels as Blender computes it: integer ``res * percentage // 100``."""
    return (int(resolution_x) * int(resolution_percentage) // 100, int(resolution_y) * int(resolution_percentage) // 100)


def resolve_sensor_fit(sensor_fit: str, width: int, height: int, pixel_aspect_x: float = 1.0, pixel_aspect_y: float = 1.0) -> str:
    """``AUTO`` resolves to HORIZONTAL when the frame is at least as wide as tall (in aspect-corrected pixels)."""
    if sensor_fit not in SENSOR_FITS:
        raise KeyframeWorldsError(f"sensor_fit must be one of {', '.join(SENSOR_FITS)}, got {sensor_fit!r}")
    if sensor_fit != "AUTO":
        return sensor_fit
    return "HORIZONTAL" if pixel_aspect_x * width >= pixel_aspect_y * height else "VERTICAL"


def intrinsics_from_blender(
    *,
    lens_mm: float,
    sensor_width_mm: float,
    sensor_height_mm: float,
    sensor_fit: str,
    shift_x: float,
    shift_y: float,
    resolution_x: int,
    resolution_y: int,
    resolution_percentage: int = 100,
    pixel_aspect_x: float = 1.0,
    pixel_aspect_y: float = 1.0,
) -> Intrinsics:
    """OpenCV pixel intrinsics of a Blender perspective camera, exactly as Blender projects.

    Follows Blender's view-plane computation: the sensor dimension used is the
    width for AUTO and HORIZONTAL fit and the height for VERTICAL; it spans the
    image width when the resolved fit is horizontal, otherwise the image height
    in aspect-corrected units (``ycor = pixel_aspect_y / pixel_aspect_x``).
    Shift is a fraction of that spanned dimension; positive ``shift_y`` moves
    the view up, so the principal point moves down in the image.

    The size is the integer render size after ``resolution_percentage``, as
    the renderer uses it. (``bpy_extras.object_utils.world_to_camera_view``
    works on the 100% frame instead; the two agree exactly whenever the
    percentage scales both sides to whole pixels.)
    """
    for name, value in (("lens_mm", lens_mm), ("sensor_width_mm", sensor_width_mm), ("sensor_height_mm", sensor_height_mm),
                        ("pixel_aspect_x", pixel_aspect_x), ("pixel_aspect_y", pixel_aspect_y)):
        if not np.isfinite(value) or value <= 0:
            raise KeyframeWorldsError(f"{name} must be a positive number, got {value!r}")
    width, height = render_resolution(resolution_x, resolution_y, resolution_percentage)
    if width <= 0 or height <= 0:
        raise KeyframeWorldsError(f"render resolution must be positive, got {width}x{height}")
    ycor = pixel_aspect_y / pixel_aspect_x
    fit = resolve_sensor_fit(sensor_fit, width, height, pixel_aspect_x, pixel_aspect_y)
    sensor_mm = sensor_height_mm if sensor_fit == "VERTICAL" else sensor_width_mm
    # viewfac: how many (x-)pixel units the sensor dimension spans.
    viewfac = width if fit == "HORIZONTAL" else ycor * height
    fx = lens_mm * viewfac / sensor_mm
    fy = fx / ycor
    cx = width / 2.0 - shift_x * viewfac
    cy = height / 2.0 + shift_y * viewfac / ycor
    return Intrinsics(float(fx), float(fy), float(cx), float(cy), int(width), int(height))


# --- projection -------------------------------------------------------------


def project_points_opencv(points_world: np.ndarray, c2w_opencv: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world points with one camera. ``points_world (N, 3)`` -> pixels ``(N, 2)``, z-depth ``(N,)`` in metres.

    Pixels are continuous coordinates (top-left corner of the image at (0, 0)).
    Points behind the camera get a negative depth; their pixels are meaningless.
    """
    w2c = c2w_to_w2c(c2w_opencv)
    p = np.asarray(points_world, dtype=np.float64)
    cam = p @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (cam[:, :2] / z[:, None]) * np.array([k[0, 0], k[1, 1]]) + np.array([k[0, 2], k[1, 2]])
    return uv, z


def unproject_pixels_opencv(uv: np.ndarray, depth_z_m: np.ndarray, c2w_opencv: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Pixels ``(N, 2)`` (continuous) with z-depths ``(N,)`` in metres -> world points ``(N, 3)``."""
    uv = np.asarray(uv, dtype=np.float64)
    z = np.asarray(depth_z_m, dtype=np.float64)
    x = (uv[:, 0] - k[0, 2]) / k[0, 0] * z
    y = (uv[:, 1] - k[1, 2]) / k[1, 1] * z
    cam = np.stack([x, y, z], -1)
    c2w = np.asarray(c2w_opencv, dtype=np.float64)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def grid_indices(size: int, stride: int) -> np.ndarray:
    """``0, stride, 2 * stride, ...`` and always ``size - 1``."""
    if stride < 1:
        raise KeyframeWorldsError(f"stride must be at least 1, got {stride}")
    idx = np.arange(0, size, stride)
    return idx if idx[-1] == size - 1 else np.append(idx, size - 1)


def unproject_depth_grid(depth_z_m: np.ndarray, c2w_opencv: np.ndarray, k: np.ndarray, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """World points of a depth map sampled every ``stride`` pixels, with their pixel coordinates.

    ``depth_z_m (H, W)`` -> points ``(h, w, 3)`` float64 in world space and
    pixel centres ``(h, w, 2)`` (continuous coordinates, so ``(i + 0.5, j + 0.5)``),
    where the sampled rows are ``0, stride, 2 * stride, ...`` plus always the
    last row (likewise columns), so a mesh over the grid reaches the frame's
    edges. Points where the depth is not positive and finite are NaN.
    """
    depth = np.asarray(depth_z_m, dtype=np.float64)
    rows, cols = grid_indices(depth.shape[0], stride), grid_indices(depth.shape[1], stride)
    u, v = np.meshgrid(cols + 0.5, rows + 0.5)
    z = depth[np.ix_(rows, cols)]
    valid = np.isfinite(z) & (z > 0)
    uv = np.stack([u, v], -1)
    pts = unproject_pixels_opencv(uv.reshape(-1, 2), np.where(valid, z, 1.0).reshape(-1), c2w_opencv, k).reshape(*z.shape, 3)
    pts[~valid] = np.nan
    return pts, uv
