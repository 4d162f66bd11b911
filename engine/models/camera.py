"""Camera conditioning of the WorldStereo networks: normalisation, Pluecker rays, pose vectors.

Conventions (those the released networks were trained with):

- Cameras are world-to-camera 4x4 matrices, OpenCV axes (x right, y down,
  z forward): ``w2c`` ``[N, 4, 4]``. Intrinsics are 3x3 pixel matrices
  ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` at the ``H x W`` of the map they
  serve, origin at the top-left image corner.
- Pluecker maps have channels ``(d_x, d_y, d_z, m_x, m_y, m_z)``: ``d`` the unit
  ray direction in (normalised) world coordinates, ``m = o x d`` with ``o`` the
  camera centre.
- The ray of pixel (row ``i``, column ``j``) goes through ``(j - 0.5, i + 0.5)``:
  the column offset has the opposite sign of the row offset. That asymmetry is
  in the training code, so it is kept here; do not "fix" it.
- Quaternions are ``(w, x, y, z)``, real part first, sign chosen so ``w >= 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...bridge.errors import KeyframeWorldsError

#: Outlier rule of the centring: cameras farther from the median centre than this
#: multiple of the 0.97 quantile of those distances are left out of the mean.
_OUTLIER_FACTOR = 10.0
_OUTLIER_QUANTILE = 0.97
_OUTLIER_CAP = 1e6
#: A first camera closer than this to the centre cannot set the scale.
_ZERO_NORM_ATOL = 1e-5


def _check_w2c(w2c: torch.Tensor, name: str = "w2c") -> None:
    if w2c.ndim != 3 or tuple(w2c.shape[1:]) != (4, 4):
        raise KeyframeWorldsError(f"{name} must be [N, 4, 4] world-to-camera matrices, got {list(w2c.shape)}")


def _center_and_scale(c2w: torch.Tensor, num_scale_cameras: int, camera_scale: float) -> torch.Tensor:
    """Shift camera centres of ``c2w [N, 4, 4]`` by the robust mean of the first
    ``num_scale_cameras`` and scale translations so camera 0 lies at distance
    ``camera_scale`` from it. Returns the normalised world-to-camera ``[N, 4, 4]``."""
    centres = c2w[:num_scale_cameras, :3, 3]
    dist_to_median = torch.norm(centres - centres.median(dim=0, keepdim=True).values, dim=-1)
    limit = torch.clamp(torch.quantile(dist_to_median, _OUTLIER_QUANTILE) * _OUTLIER_FACTOR, max=_OUTLIER_CAP)
    offset = centres[dist_to_median <= limit].mean(dim=0, keepdim=True)
    c2w = c2w.clone()
    c2w[:, :3, 3] -= offset
    w2c = torch.linalg.inv(c2w)
    first_norm = torch.norm(c2w[0, :3, 3])
    if torch.isclose(first_norm, torch.zeros((), dtype=c2w.dtype, device=c2w.device), atol=_ZERO_NORM_ATOL):
        factor = camera_scale  # pure rotation: nothing to measure a scale by
    else:
        factor = camera_scale / first_norm
    w2c[:, :3, 3] *= factor
    return w2c


def camera_center_normalization(w2c: torch.Tensor, frames_per_trajectory: int, camera_scale: float = 2.0,
                                right_multiply: bool = True) -> torch.Tensor:
    """Normalise ``B`` stacked trajectories ``w2c [B*F, 4, 4]``: first camera of each at identity,
    centred, scaled.

    1. Each trajectory is re-expressed relative to its first camera:
       ``w2c @ inv(w2c_first)`` (``right_multiply=True``, the geometric form used for
       the Pluecker maps), or ``inv(w2c_first) @ w2c`` (``False``: an older form the
       camera variant's forward applies to its unused extrinsics; kept for parity).
    2. Centres are shifted by the mean of the non-outlier centres, taken over all
       ``B*F`` cameras together.
    3. Translations are scaled so the very first camera's centre has norm
       ``camera_scale`` (factor ``camera_scale`` if that centre is at the origin).
    """
    _check_w2c(w2c)
    if frames_per_trajectory <= 0 or w2c.shape[0] % frames_per_trajectory:
        raise KeyframeWorldsError(
            f"{w2c.shape[0]} cameras cannot be split into trajectories of {frames_per_trajectory} frames"
        )
    w2c = w2c.float()
    first_c2w = w2c[::frames_per_trajectory].inverse().repeat_interleave(frames_per_trajectory, dim=0)
    w2c = w2c @ first_c2w if right_multiply else first_c2w @ w2c
    return _center_and_scale(torch.linalg.inv(w2c), w2c.shape[0], camera_scale)


def unified_camera_normalization(w2c: torch.Tensor, w2c_ref: torch.Tensor, camera_scale: float = 2.0
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Put targets ``[F, 4, 4]`` and references ``[F_ref, 4, 4]`` in one normalised frame.

    All cameras are right-multiplied by the inverse of the first target; the
    centring offset and the scale come from the targets only and apply to all.
    Returns ``(w2c [F, 4, 4], w2c_ref [F_ref, 4, 4])``.
    """
    _check_w2c(w2c)
    _check_w2c(w2c_ref, "w2c_ref")
    num_targets = w2c.shape[0]
    combined = torch.cat([w2c.float(), w2c_ref.float()], dim=0)
    combined = combined @ combined[0:1].inverse()
    out = _center_and_scale(torch.linalg.inv(combined), num_targets, camera_scale)
    return out[:num_targets], out[num_targets:]


def pixel_rays(intrinsics: torch.Tensor, w2c: torch.Tensor, height: int, width: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions ``[N, H*W, 3]`` (rows outer, columns inner) in world coordinates."""
    _check_w2c(w2c)
    if intrinsics.shape != (w2c.shape[0], 3, 3):
        raise KeyframeWorldsError(f"intrinsics must be [{w2c.shape[0]}, 3, 3], got {list(intrinsics.shape)}")
    device = intrinsics.device
    c2w = torch.inverse(w2c)[:, :3, :4]
    cols = torch.arange(width, device=device).float() - 0.5   # see module docstring
    rows = torch.arange(height, device=device).float() + 0.5
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")  # [H, W]
    pixels = torch.stack([grid_cols, grid_rows, torch.ones_like(grid_cols)], dim=-1).reshape(1, -1, 3)
    camera_dirs = pixels @ intrinsics.inverse().transpose(-1, -2)  # [N, H*W, 3], depth 1
    directions = F.normalize(camera_dirs @ c2w[:, :3, :3].transpose(-1, -2), dim=-1)
    origins = c2w[:, None, :3, 3].expand_as(directions)
    return origins, directions


def plucker_from_rays(origins: torch.Tensor, directions: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B*F, N, 3]`` rays -> ``[B, F, N, 6]``: ``(d, o x d)``."""
    moment = torch.cross(origins, directions, dim=-1)
    return torch.cat([directions, moment], dim=-1).unflatten(0, (-1, frames))


def plucker_embedding(intrinsics: torch.Tensor, w2c: torch.Tensor, frames: int, height: int, width: int,
                      normalize: bool = True, right_multiply: bool = True) -> torch.Tensor:
    """The ``camera_embedding`` input: Pluecker map ``[B, 6, F, H, W]`` of ``B`` trajectories of ``F`` frames.

    ``intrinsics [B*F, 3, 3]`` at ``H x W``; ``w2c [B*F, 4, 4]``. With ``normalize``
    the cameras first go through :func:`camera_center_normalization` (scale 2,
    ``right_multiply`` as given; the pipelines use ``True``). A map holding any
    non-finite value is replaced by zeros, as in training.
    """
    if normalize:
        w2c = camera_center_normalization(w2c, frames, camera_scale=2.0, right_multiply=right_multiply)
    origins, directions = pixel_rays(intrinsics, w2c, height, width)
    emb = plucker_from_rays(origins, directions, frames)  # [B, F, H*W, 6]
    emb = emb.unflatten(2, (height, width)).permute(0, 4, 1, 2, 3).contiguous()  # [B, 6, F, H, W]
    if not torch.isfinite(emb).all():
        emb = torch.zeros_like(emb)
    return emb


def matrix_to_quaternion(rotation: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> unit quaternions ``[..., 4]`` ``(w, x, y, z)``, ``w >= 0``.

    Of the four algebraically equal formulas (each divides by one of ``4w^2,
    4x^2, 4y^2, 4z^2``) the one with the largest divisor is used, which stays
    accurate near 180-degree rotations.
    """
    if rotation.shape[-2:] != (3, 3):
        raise KeyframeWorldsError(f"rotation matrices must be [..., 3, 3], got {list(rotation.shape)}")
    m = rotation.reshape(*rotation.shape[:-2], 9).unbind(-1)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m
    # 4 * (w^2, x^2, y^2, z^2)
    four_sq = torch.stack([1.0 + m00 + m11 + m22, 1.0 + m00 - m11 - m22,
                           1.0 - m00 + m11 - m22, 1.0 - m00 - m11 + m22], dim=-1)
    two_abs = torch.where(four_sq > 0, torch.sqrt(four_sq.clamp(min=0)), torch.zeros_like(four_sq))  # 2|q_i|
    # row i: 4 q_i * (w, x, y, z)
    by_component = torch.stack([
        torch.stack([two_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
        torch.stack([m21 - m12, two_abs[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
        torch.stack([m02 - m20, m10 + m01, two_abs[..., 2] ** 2, m12 + m21], dim=-1),
        torch.stack([m10 - m01, m20 + m02, m21 + m12, two_abs[..., 3] ** 2], dim=-1),
    ], dim=-2)
    floor = torch.tensor(0.1, dtype=two_abs.dtype, device=two_abs.device)
    candidates = by_component / (2.0 * two_abs[..., None].maximum(floor))
    best = two_abs.argmax(dim=-1)[..., None, None].expand(*two_abs.shape[:-1], 1, 4)
    quat = torch.gather(candidates, -2, best).squeeze(-2)
    return torch.where(quat[..., 0:1] < 0, -quat, quat)


def camera_pose_vectors(w2c: torch.Tensor) -> torch.Tensor:
    """``[N, 4, 4]`` world-to-camera -> ``[N, 7]`` ``(q_w, q_x, q_y, q_z, t_x, t_y, t_z)``."""
    _check_w2c(w2c)
    return torch.cat([matrix_to_quaternion(w2c[:, :3, :3]), w2c[:, :3, 3]], dim=-1)


def camera_qt(w2c: torch.Tensor, w2c_ref: torch.Tensor, camera_scale: float = 2.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory variants' ``camera_qt [1, F, 7]`` and ``camera_qt_ref [1, F_ref, 7]``
    from raw targets ``[F, 4, 4]`` and references ``[F_ref, 4, 4]``."""
    target, ref = unified_camera_normalization(w2c, w2c_ref, camera_scale)
    return camera_pose_vectors(target)[None], camera_pose_vectors(ref)[None]
