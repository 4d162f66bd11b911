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
- Lens models are COLMAP's camera models (``LENS_MODELS``), with their
  parameters in COLMAP's order. COLMAP's pixel convention is ours (the
  top-left corner of the image is (0, 0)), and its distortion maps ideal
  pinhole normalised coordinates ``(x / z, y / z)`` to distorted ones, which
  ``fx, fy, cx, cy`` then take to pixels.

Everything here is a pure function of numbers (numpy arrays); nothing imports
bpy. Matrices broadcast over leading batch dimensions: shapes are ``(..., 4, 4)``.
"""

from __future__ import annotations

import math
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


def blender_lens_and_shift(fx: float, cx: float, cy: float, width: int, height: int, sensor_width_mm: float,
                           ycor: float = 1.0) -> tuple[float, float, float]:
    """``(lens_mm, shift_x, shift_y)`` of a Blender camera with HORIZONTAL sensor fit that projects with pixel
    intrinsics ``fx, cx, cy`` on a ``width`` x ``height`` output (``fy = fx / ycor``, the render's pixel aspect):
    the inverse of ``intrinsics_from_blender`` for that fit."""
    return (float(fx) * sensor_width_mm / width, (width / 2.0 - float(cx)) / width, (float(cy) - height / 2.0) * ycor / width)


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


# --- lens models and distortion (COLMAP's camera models) -------------------------


@dataclass(frozen=True)
class LensModel:
    """One of COLMAP's camera models.

    Attributes:
        name: COLMAP's model name (``cameras.txt``), the one vocabulary for lens models here.
        colmap_id: its ``model_id`` in COLMAP's ``cameras.bin``.
        single_focal: one focal length ``f`` (``fx == fy``) instead of ``fx, fy``.
        params: names of the distortion parameters, in COLMAP's order (after focal length and principal point).
        fisheye: distortion acts on the angle from the axis (``theta = atan(r)``), not on ``r``;
            such a lens is never a pinhole, even with every parameter zero (it is then equidistant).
    """

    name: str
    colmap_id: int
    single_focal: bool
    params: tuple[str, ...]
    fisheye: bool = False

    @property
    def colmap_param_names(self) -> tuple[str, ...]:
        """Every parameter of the model in a COLMAP camera line: focal length(s), principal point, distortion."""
        return (("f",) if self.single_focal else ("fx", "fy")) + ("cx", "cy") + self.params


LENS_MODELS: dict[str, LensModel] = {
    m.name: m
    for m in (
        LensModel("SIMPLE_PINHOLE", 0, True, ()),
        LensModel("PINHOLE", 1, False, ()),
        LensModel("SIMPLE_RADIAL", 2, True, ("k",)),
        LensModel("RADIAL", 3, True, ("k1", "k2")),
        LensModel("OPENCV", 4, False, ("k1", "k2", "p1", "p2")),
        LensModel("OPENCV_FISHEYE", 5, False, ("k1", "k2", "k3", "k4"), fisheye=True),
        LensModel("FULL_OPENCV", 6, False, ("k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6")),
        LensModel("SIMPLE_RADIAL_FISHEYE", 8, True, ("k",), fisheye=True),
        LensModel("RADIAL_FISHEYE", 9, True, ("k1", "k2"), fisheye=True),
    )
}
LENS_MODEL_IDS: dict[int, LensModel] = {m.colmap_id: m for m in LENS_MODELS.values()}

# The two families every model is a special case of: Brown-Conrady with a rational radial term
# (OpenCV's "rational model", COLMAP's FULL_OPENCV) and the OpenCV fisheye polynomial in theta.
_BROWN_NAMES = ("k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6")
_FISHEYE_NAMES = ("k1", "k2", "k3", "k4")


@dataclass(frozen=True)
class Distortion:
    """A camera's lens model: ``model`` (a ``LENS_MODELS`` name) and its distortion ``params`` in COLMAP's order.

    Focal length and principal point are not here: they are the trajectory's
    ``fx, fy, cx, cy`` (for a single-focal model, ``fx == fy == f``). A frame
    without a ``Distortion`` is a plain pinhole (COLMAP's PINHOLE).
    """

    model: str
    params: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.model not in LENS_MODELS:
            raise KeyframeWorldsError(f"unknown camera model {self.model!r}; known: {', '.join(LENS_MODELS)}")
        try:
            params = tuple(float(p) for p in self.params)
        except (TypeError, ValueError):
            raise KeyframeWorldsError(f"camera model {self.model}: parameters must be numbers, got {self.params!r}") from None
        names = LENS_MODELS[self.model].params
        if len(params) != len(names):
            raise KeyframeWorldsError(f"camera model {self.model} has {len(names)} distortion parameter(s) "
                                      f"({', '.join(names) or 'none'}), got {len(params)}")
        if not all(math.isfinite(p) for p in params):
            raise KeyframeWorldsError(f"camera model {self.model}: distortion parameters must be finite, got {list(params)}")
        object.__setattr__(self, "params", params)

    @property
    def lens(self) -> LensModel:
        return LENS_MODELS[self.model]

    @property
    def is_pinhole(self) -> bool:
        """Whether it projects exactly like a pinhole: not a fisheye, every parameter zero."""
        return not self.lens.fisheye and not any(self.params)

    def named(self) -> dict[str, float]:
        """``{parameter name: value}`` in COLMAP's order."""
        return dict(zip(self.lens.params, self.params))

    def describe(self) -> str:
        """``OPENCV k1=-0.1 k2=0.01 p1=0 p2=0``, for messages."""
        return " ".join([self.model] + [f"{k}={v:g}" for k, v in self.named().items()])

    def opencv_coefficients(self) -> tuple[float, ...]:
        """The same lens as OpenCV's distortion coefficients.

        A fisheye model gives ``cv2.fisheye``'s ``(k1, k2, k3, k4)``; any other
        gives ``(k1, k2, p1, p2, k3, k4, k5, k6)``, OpenCV's rational model
        (``CALIB_RATIONAL_MODEL``; with k4 = k5 = k6 = 0 it is the plain
        five-coefficient model). Parameters a model lacks are zero.
        """
        return self._family(_FISHEYE_NAMES if self.lens.fisheye else _BROWN_NAMES)

    @classmethod
    def from_opencv_coefficients(cls, model: str, coefficients) -> "Distortion":
        """``model`` with its parameters taken from ``opencv_coefficients`` form; refuses coefficients the model cannot hold."""
        if model not in LENS_MODELS:
            raise KeyframeWorldsError(f"unknown camera model {model!r}; known: {', '.join(LENS_MODELS)}")
        lens = LENS_MODELS[model]
        names = _FISHEYE_NAMES if lens.fisheye else _BROWN_NAMES
        coefficients = tuple(float(c) for c in coefficients)
        if len(coefficients) != len(names):
            raise KeyframeWorldsError(f"{model}: expected {len(names)} coefficients ({', '.join(names)}), got {len(coefficients)}")
        values = dict(zip(names, coefficients))
        own = tuple("k1" if k == "k" else k for k in lens.params)
        extra = {k: v for k, v in values.items() if k not in own and v != 0}
        if extra:
            raise KeyframeWorldsError(f"{model} has no {', '.join(f'{k}={v:g}' for k, v in extra.items())}")
        return cls(model, tuple(values[k] for k in own))

    def _family(self, names: tuple[str, ...]) -> tuple[float, ...]:
        # A one-parameter model's "k" is the family's k1; the other parameters of the family are zero.
        named = {("k1" if k == "k" else k): v for k, v in self.named().items()}
        return tuple(named.get(k, 0.0) for k in names)


def distort_normalized(xy: np.ndarray, distortion: Distortion | None) -> np.ndarray:
    """Ideal (pinhole) normalised coordinates ``(x / z, y / z)`` -> distorted normalised coordinates. ``(..., 2)``.

    The distorted coordinates go to pixels as ``(fx * xd + cx, fy * yd + cy)``.
    These are COLMAP's formulas: for the pinhole-family models
    ``xd = x * R + 2 p1 x y + p2 (r^2 + 2 x^2)`` (likewise ``yd`` with p1, p2 swapped),
    ``R = (1 + k1 r^2 + k2 r^4 + k3 r^6) / (1 + k4 r^2 + k5 r^4 + k6 r^6)``; for the
    fisheye models ``theta = atan(r)``, ``theta_d = theta (1 + k1 theta^2 + ... + k4 theta^8)``,
    ``xd = x * theta_d / r``. ``None`` (a pinhole) returns the points unchanged.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if distortion is None:
        return xy.copy()
    x, y = xy[..., 0], xy[..., 1]
    if distortion.lens.fisheye:
        r = np.hypot(x, y)
        theta = np.arctan(r)
        theta_d = theta * _fisheye_poly(theta * theta, distortion._family(_FISHEYE_NAMES))
        with np.errstate(divide="ignore", invalid="ignore"):
            # theta_d / r -> 1 as r -> 0.
            scale = np.where(r > 1e-15, theta_d / r, 1.0)
        return xy * scale[..., None]
    xd, yd = _brown(x, y, distortion._family(_BROWN_NAMES))[:2]
    return np.stack([xd, yd], -1)


def undistort_normalized(xy_distorted: np.ndarray, distortion: Distortion | None, *, max_iterations: int = 100,
                         tolerance: float = 1e-14) -> np.ndarray:
    """Distorted normalised coordinates -> ideal (pinhole) normalised coordinates. ``(..., 2)``.

    The inverse of ``distort_normalized``, by Newton's method: in two
    dimensions with the analytic Jacobian for the pinhole-family models, in
    ``theta`` alone for the fisheye models (their distortion is radial in
    ``theta``). Points with no inverse (beyond where the distortion folds back,
    or at or beyond 90 degrees off axis for a fisheye) come back as NaN.
    """
    xy_distorted = np.asarray(xy_distorted, dtype=np.float64)
    if distortion is None or distortion.is_pinhole:
        return xy_distorted.copy()
    xd, yd = xy_distorted[..., 0], xy_distorted[..., 1]
    with np.errstate(all="ignore"):
        if distortion.lens.fisheye:
            k = distortion._family(_FISHEYE_NAMES)
            theta_d = np.hypot(xd, yd)
            theta = theta_d.copy()
            for _ in range(max_iterations):
                t2 = theta * theta
                f = theta * _fisheye_poly(t2, k) - theta_d
                df = 1.0 + t2 * (3 * k[0] + t2 * (5 * k[1] + t2 * (7 * k[2] + t2 * 9 * k[3])))
                step = f / df
                theta = theta - step
                if not np.any(np.abs(step) > tolerance):
                    break
            residual = np.abs(theta * _fisheye_poly(theta * theta, k) - theta_d)
            ok = np.isfinite(theta) & (theta >= 0) & (theta < np.pi / 2) & (residual <= 1e-9 * np.maximum(1.0, theta_d))
            ok &= _increasing_up_to(theta, lambda t: 1.0 + t * t * (3 * k[0] + t * t * (5 * k[1] + t * t * (7 * k[2] + t * t * 9 * k[3]))))
            scale = np.where(theta_d > 1e-15, np.tan(theta) / theta_d, 1.0)
            out = xy_distorted * scale[..., None]
        else:
            c = distortion._family(_BROWN_NAMES)
            x, y = xd.copy(), yd.copy()
            for _ in range(max_iterations):
                fx, fy, jxx, jxy, jyx, jyy = _brown(x, y, c, jacobian=True)
                ex, ey = fx - xd, fy - yd
                det = jxx * jyy - jxy * jyx
                dx = (jyy * ex - jxy * ey) / det
                dy = (jxx * ey - jyx * ex) / det
                x, y = x - dx, y - dy
                if not np.any(np.maximum(np.abs(dx), np.abs(dy)) > tolerance):
                    break
            fx, fy = _brown(x, y, c)[:2]
            residual = np.maximum(np.abs(fx - xd), np.abs(fy - yd))
            ok = np.isfinite(x) & np.isfinite(y) & (residual <= 1e-9 * np.maximum(1.0, np.hypot(xd, yd)))
            ok &= _increasing_up_to(np.hypot(x, y), lambda r: _brown_radial_slope(r, c))
            out = np.stack([x, y], -1)
    out[~ok] = np.nan
    return out


#: Samples per side of the plate's outline whose undistortion bounds the pinhole frame (``pinhole_keeping_fov``).
OUTLINE_SAMPLES = 65
#: A pinhole sees at most this far off axis (tan of the half angle, 80 degrees): a fisheye's wider rays are cropped.
MAX_PINHOLE_TAN = float(np.tan(np.radians(80.0)))


def pinhole_keeping_fov(intr: Intrinsics, distortion: Distortion, undistort=None) -> Intrinsics:
    """The pinhole, at the same size and pixel aspect, whose frame holds every pixel of the distorted image ``intr``.

    The plate's outline (``OUTLINE_SAMPLES`` points a side, continuous pixels) is undistorted to ideal normalised
    coordinates by ``undistort`` (``(N, 2)`` pixels -> ``(N, 2)``; default this module's Newton inverse, the engine
    passes OpenCV's); one scale of ``fx, fy`` and a principal point fit its bounding box into the frame, centred.
    Rays past ``MAX_PINHOLE_TAN`` (a fisheye's widest) are cropped, and an outline point without an inverse counts
    as the centre. The engine undistorts its jobs to this pinhole; the add-on renders a distorted camera's reference
    through it.
    """
    if undistort is None:
        def undistort(px):
            return undistort_normalized(np.stack([(px[:, 0] - intr.cx) / intr.fx, (px[:, 1] - intr.cy) / intr.fy], -1), distortion)
    t = np.linspace(0.0, 1.0, OUTLINE_SAMPLES)
    w, h = float(intr.width), float(intr.height)
    outline = np.concatenate([np.stack([t * w, np.zeros_like(t)], -1), np.stack([t * w, np.full_like(t, h)], -1),
                              np.stack([np.zeros_like(t), t * h], -1), np.stack([np.full_like(t, w), t * h], -1)])
    xy = np.asarray(undistort(outline), dtype=np.float64)
    xy = np.clip(np.nan_to_num(xy, nan=0.0, posinf=MAX_PINHOLE_TAN, neginf=-MAX_PINHOLE_TAN), -MAX_PINHOLE_TAN, MAX_PINHOLE_TAN)
    lo, hi = xy.min(0), xy.max(0)
    scale = min(w / (intr.fx * (hi[0] - lo[0])), h / (intr.fy * (hi[1] - lo[1])))
    fx, fy = intr.fx * scale, intr.fy * scale
    return Intrinsics(float(fx), float(fy), float(w / 2 - fx * (hi[0] + lo[0]) / 2), float(h / 2 - fy * (hi[1] + lo[1]) / 2),
                      intr.width, intr.height)


def distort_pixels(uv: np.ndarray, k: np.ndarray, distortion: Distortion | None) -> np.ndarray:
    """Where a pinhole camera ``k`` (3x3) would see pixels ``uv (..., 2)``, the distorted camera sees them. Continuous pixels."""
    fx, fy, cx, cy = _k_terms(k)
    uv = np.asarray(uv, dtype=np.float64)
    xy = np.stack([(uv[..., 0] - cx) / fx, (uv[..., 1] - cy) / fy], -1)
    d = distort_normalized(xy, distortion)
    return np.stack([d[..., 0] * fx + cx, d[..., 1] * fy + cy], -1)


def undistort_pixels(uv_distorted: np.ndarray, k: np.ndarray, distortion: Distortion | None, **newton) -> np.ndarray:
    """Pixels ``(..., 2)`` of the distorted camera -> where the pinhole camera with the same ``k`` sees them (NaN: none)."""
    fx, fy, cx, cy = _k_terms(k)
    uv = np.asarray(uv_distorted, dtype=np.float64)
    xy = np.stack([(uv[..., 0] - cx) / fx, (uv[..., 1] - cy) / fy], -1)
    u = undistort_normalized(xy, distortion, **newton)
    return np.stack([u[..., 0] * fx + cx, u[..., 1] * fy + cy], -1)


def _increasing_up_to(radius: np.ndarray, slope, samples: int = 33) -> np.ndarray:
    """Whether ``slope`` (the derivative of distorted by ideal radius) stays positive from 0 to each ``radius``.

    Newton's method can land on a second root beyond the radius where the
    distortion folds back; such a point is no image of the lens's own rays.
    """
    r = np.nan_to_num(radius, nan=0.0)[..., None] * np.linspace(0.0, 1.0, samples)
    return np.all(slope(r) > 0, axis=-1)


def _brown_radial_slope(r: np.ndarray, c: tuple[float, ...]) -> np.ndarray:
    """``d(r * R(r)) / dr`` of the radial part of the FULL_OPENCV distortion (tangential terms are small beside it)."""
    k1, k2, _, _, k3, k4, k5, k6 = c
    r2 = r * r
    num = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    den = 1.0 + r2 * (k4 + r2 * (k5 + r2 * k6))
    dnum = k1 + r2 * (2 * k2 + r2 * 3 * k3)
    dden = k4 + r2 * (2 * k5 + r2 * 3 * k6)
    return num / den + 2 * r2 * (dnum * den - num * dden) / (den * den)


def _k_terms(k: np.ndarray) -> tuple[float, float, float, float]:
    k = np.asarray(k, dtype=np.float64)
    return float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2])


def _fisheye_poly(t2: np.ndarray, k: tuple[float, ...]) -> np.ndarray:
    """``1 + k1 t2 + k2 t2^2 + k3 t2^3 + k4 t2^4`` (``t2`` = theta squared)."""
    return 1.0 + t2 * (k[0] + t2 * (k[1] + t2 * (k[2] + t2 * k[3])))


def _brown(x: np.ndarray, y: np.ndarray, c: tuple[float, ...], jacobian: bool = False) -> tuple[np.ndarray, ...]:
    """FULL_OPENCV distortion of ``(x, y)``: ``(xd, yd)`` and, with ``jacobian``, ``d(xd, yd) / d(x, y)`` row by row."""
    k1, k2, p1, p2, k3, k4, k5, k6 = c
    r2 = x * x + y * y
    num = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    den = 1.0 + r2 * (k4 + r2 * (k5 + r2 * k6))
    radial = num / den
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + 2 * p2 * x * y + p1 * (r2 + 2 * y * y)
    if not jacobian:
        return xd, yd
    # d(radial) / d(r^2), then the chain rule through d(r^2) / dx = 2x.
    dnum = k1 + r2 * (2 * k2 + r2 * 3 * k3)
    dden = k4 + r2 * (2 * k5 + r2 * 3 * k6)
    dradial = (dnum * den - num * dden) / (den * den)
    jxx = radial + 2 * x * x * dradial + 2 * p1 * y + 6 * p2 * x
    jxy = 2 * x * y * dradial + 2 * p1 * x + 2 * p2 * y
    jyx = 2 * x * y * dradial + 2 * p2 * y + 2 * p1 * x
    jyy = radial + 2 * y * y * dradial + 2 * p2 * x + 6 * p1 * y
    return xd, yd, jxx, jxy, jyx, jyy


# --- lens models as Blender's movie-clip tracking camera (libmv) ---------------------------------

#: Blender's tracking camera distortion models (``MovieTrackingCamera.distortion_model``).
BLENDER_DISTORTION_MODELS = ("POLYNOMIAL", "DIVISION", "NUKE", "BROWN")


def distortion_to_blender_tracking(distortion: Distortion | None) -> tuple[str, dict[str, float]]:
    """A lens as Blender's movie-clip tracking camera holds it: ``(distortion_model, {property: value})``.

    Blender's models are libmv's: ``POLYNOMIAL`` (radial ``k1 k2 k3`` on r^2, r^4, r^6) and ``BROWN``
    (radial ``brown_k1..k4`` up to r^8, tangential ``brown_p1, brown_p2``) distort ideal normalised
    coordinates as COLMAP's pinhole-family models do, with two differences in the tangential terms. libmv's
    ``p1`` multiplies ``r^2 + 2 x^2`` (OpenCV's and COLMAP's ``p2``) and its ``p2`` multiplies ``2 x y`` (their
    ``p1``), so the two swap. And Blender applies the lens with y up (images bottom row first, the principal
    point measured from the bottom), where OpenCV's y points down: the terms odd in y change sign, so
    ``brown_p2`` is minus OpenCV's ``p1`` while ``brown_p1`` is OpenCV's ``p2``. (Radial terms are even in y.
    Checked by Blender's own Movie Distortion node in ``tests/test_blender_plate_lineup.py``.)
    ``DIVISION`` and ``NUKE`` model undistortion instead and no COLMAP model maps onto them. A radial-only
    lens becomes ``POLYNOMIAL``; one with tangential terms ``BROWN``. Raises ``KeyframeWorldsError`` for a
    lens Blender's models cannot hold: the fisheyes (no fisheye model) and FULL_OPENCV with its rational
    terms ``k4 k5 k6``. None (a pinhole) is ``POLYNOMIAL`` with every coefficient zero.
    """
    if distortion is None:
        return "POLYNOMIAL", {"k1": 0.0, "k2": 0.0, "k3": 0.0}
    if distortion.lens.fisheye:
        raise KeyframeWorldsError(f"camera model {distortion.model} is a fisheye, which Blender's tracking camera cannot hold "
                                  f"(its models: {', '.join(BLENDER_DISTORTION_MODELS)})")
    k1, k2, p1, p2, k3, k4, k5, k6 = distortion.opencv_coefficients()
    if k4 or k5 or k6:
        raise KeyframeWorldsError(f"camera model {distortion.model} has rational terms (k4={k4:g} k5={k5:g} k6={k6:g}), which "
                                  "Blender's tracking camera cannot hold")
    if not (p1 or p2):
        return "POLYNOMIAL", {"k1": k1, "k2": k2, "k3": k3}
    return "BROWN", {"brown_k1": k1, "brown_k2": k2, "brown_k3": k3, "brown_k4": 0.0, "brown_p1": p2, "brown_p2": -p1}
