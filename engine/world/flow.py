"""WorldReel's 4D outputs of consecutive frames: point maps, optical flow (observed and rigid), scene flow, dynamic mask.

Conventions (DESIGN.md, ``cameras.py``): cameras are camera-to-world in OpenCV axes
(x right, y down, z forward) with intrinsics ``(fx, fy, cx, cy)`` in pixels; pixel
``(col i, row j)`` has its centre at ``(i + 0.5, j + 0.5)``; depth is z-depth in metres,
0 where there is no surface.

Flow is forward, from frame t to frame t+1 of the same trajectory, in pixels of the
output resolution: ``flow[j, i] = (du, dv)`` carries the centre of pixel ``(i, j)`` of
frame t to ``(i + 0.5 + du, j + 0.5 + dv)`` in frame t+1 (u to the right, v down).

- observed flow: estimated from the two RGB frames (OpenCV's DIS on the CPU, or RAFT
  from torchvision with a local weights file); a vector at every pixel.
- rigid flow: where frame t's surface point (its depth and camera) lands in camera t+1
  if the world is static; NaN where frame t has no surface or the point is behind camera t+1.
- scene flow: world-space motion in metres of each pixel's surface point: the point of
  pixel p at t (depth t) to the point at ``p + observed flow`` at t+1 (frame t+1's point map,
  sampled bilinearly); NaN where it cannot be measured (no surface at either end, a depth edge
  under the sample, the flow leaves the frame, or the pixel is occluded).
- dynamic mask: among the pixels whose observed flow passes the forward-backward check,
  those where observed and rigid flow disagree (by more than ``DYNAMIC_THRESHOLD_PX`` plus
  ``DYNAMIC_RELATIVE`` of the rigid flow) and the rigid flow explains the colours worse.

Everything here is a pure function of its inputs (the estimators are deterministic), so
a resumed job writes the same files as an uninterrupted one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...bridge.cameras import intrinsics_matrix, project_points_opencv, unproject_depth_grid
from ...bridge.errors import KeyframeWorldsError

#: Forward-backward check (Sundaram, Brox & Keutzer 2010): pixel p is occluded (or its flow is unreliable) when
#: ``|f(p) + b(p + f(p))|^2 > FB_ALPHA * (|f(p)|^2 + |b(p + f(p))|^2) + FB_BETA_PX2``.
FB_ALPHA = 0.01
FB_BETA_PX2 = 0.5
#: A checked pixel is dynamic (the video contradicts its geometry there) when observed and rigid flow differ by more
#: than DYNAMIC_THRESHOLD_PX + DYNAMIC_RELATIVE * |rigid flow| pixels (DIS errs more where the motion is large) and the
#: rigid flow explains its colour worse than the observed flow does: the absolute RGB difference (luminance-weighted)
#: between frame t and frame t+1 sampled along each flow, averaged over PHOTOMETRIC_WINDOW_PX-square windows. The
#: colour test keeps the estimator's own mistakes (a moving object's flow bleeding a few pixels into the still
#: background, untextured areas) out of the mask: there the rigid flow matches the colours at least as well.
DYNAMIC_THRESHOLD_PX = 3.0
DYNAMIC_RELATIVE = 0.1
PHOTOMETRIC_WINDOW_PX = 5
#: Scene flow is not measured where the four depths bilinear sampling reads at t+1 spread by more than this (relative):
#: a depth edge, where interpolation would invent a surface between foreground and background.
DEPTH_EDGE_RELATIVE = 0.05

#: Values of the dynamic mask PNG.
MASK_STATIC, MASK_UNCHECKED, MASK_DYNAMIC = 0, 128, 255
#: The fused cloud's consistency comes from the mask counted in cells of this many pixels (kept per frame).
CONSISTENCY_CELL_PX = 8

#: A torchvision RAFT state dict (``raft_large`` or ``raft_small``), for ``geometry.flow = "raft"``.
RAFT_WEIGHTS_ENV = "KEYFRAME_WORLDS_RAFT_WEIGHTS"


# --- per-frame and per-pair geometry ---------------------------------------------------------------------------------
# numpy (the bridge's camera functions, which own the conventions) and OpenCV (sampling, one thread): this runs on the
# bundle's 4D thread beside the generator's torch work, and torch there would compete with the generator for
# torch's one thread pool (its OpenMP threads spin while they wait: both slow down several times over).


def _k(intrinsics) -> np.ndarray:
    fx, fy, cx, cy = (float(x) for x in np.asarray(intrinsics, dtype=np.float64).reshape(-1)[:4])
    return intrinsics_matrix(fx, fy, cx, cy)


def _pixel_centres(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) float32 ``u`` (column) and ``v`` (row) of the pixel centres."""
    u = np.arange(width, dtype=np.float32) + 0.5
    v = np.arange(height, dtype=np.float32) + 0.5
    return np.broadcast_to(u[None, :], (height, width)), np.broadcast_to(v[:, None], (height, width))


def point_map(depth_z_m: np.ndarray, c2w_opencv, intrinsics) -> np.ndarray:
    """World XYZ (metres) of every pixel's surface point: (H, W, 3) float32, NaN where depth is 0 (no surface).

    depth_z_m: (H, W) z-depth; c2w_opencv: (4, 4); intrinsics: (4,) fx, fy, cx, cy.
    """
    points, _uv = unproject_depth_grid(depth_z_m, np.asarray(c2w_opencv, dtype=np.float64), _k(intrinsics), stride=1)
    return points.astype(np.float32)


def rigid_flow(points_world: np.ndarray, c2w_next, intrinsics_next) -> np.ndarray:
    """Camera-induced flow of frame t's point map into camera t+1, as if the world were static.

    points_world: (H, W, 3) frame t's point map (NaN: no surface). Returns (H, W, 2) float32 flow in pixels, NaN where
    there is no surface or the point is not in front of camera t+1.
    """
    height, width = points_world.shape[:2]
    uv, z = project_points_opencv(points_world.reshape(-1, 3), np.asarray(c2w_next, dtype=np.float64), _k(intrinsics_next))
    u, v = _pixel_centres(width, height)
    flow = (uv.reshape(height, width, 2) - np.stack([u, v], -1)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        flow[~(z.reshape(height, width) > 1e-6)] = np.nan  # also where the point is NaN
    return flow


def _norm2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Squared length of vectors given by components (faster than a sum over a last axis of two)."""
    return x * x + y * y


def _sample(image: np.ndarray, u: np.ndarray, v: np.ndarray, nearest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W) or (H, W, C) image (float32, or uint8 kept uint8) at continuous coordinates u, v (H, W) (pixel centres
    at i + 0.5), and (H, W) bool: inside the image (``0 <= u <= W, 0 <= v <= H``; False for NaN).

    Bilinear (OpenCV's remap: positions to 1/32 px), or with ``nearest`` the pixel whose top-left centre is at or
    just before (u, v) (the first of the four bilinear taps). Outside the image it repeats the edge pixel.
    """
    import cv2

    height, width = image.shape[:2]
    with np.errstate(invalid="ignore"):
        inside = (u >= 0) & (u <= width) & (v >= 0) & (v <= height)
    x = np.clip(np.where(inside, u, 0.5) - 0.5, 0, width - 1).astype(np.float32)
    y = np.clip(np.where(inside, v, 0.5) - 0.5, 0, height - 1).astype(np.float32)
    if nearest:
        x, y = np.floor(x), np.floor(y)
    image = np.ascontiguousarray(image if image.dtype == np.uint8 else image.astype(np.float32, copy=False))
    return cv2.remap(image, x, y, cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), inside


def forward_backward_check(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of frame t the observed flow follows into frame t+1: ``p + f(p)`` lies in frame t+1
    and the backward flow there leads back to p (the FB_ALPHA / FB_BETA_PX2 test). The others are occluded at t+1,
    leave the frame, or have unreliable flow.

    forward: (H, W, 2) flow t -> t+1; backward: (H, W, 2) flow t+1 -> t.
    """
    height, width = forward.shape[:2]
    u, v = _pixel_centres(width, height)
    back, inside = _sample(backward, u + forward[..., 0], v + forward[..., 1])
    round_trip = _norm2(forward[..., 0] + back[..., 0], forward[..., 1] + back[..., 1])
    bound = FB_ALPHA * (_norm2(forward[..., 0], forward[..., 1]) + _norm2(back[..., 0], back[..., 1])) + FB_BETA_PX2
    with np.errstate(invalid="ignore"):
        return inside & (round_trip <= bound)


def scene_flow(points_world: np.ndarray, observed: np.ndarray, followed: np.ndarray, depth_next: np.ndarray,
               points_next: np.ndarray) -> np.ndarray:
    """World-space motion of each pixel's surface point from t to t+1: (H, W, 3) float32 metres, NaN where unknown.

    points_world, points_next: the point maps of frames t and t+1 (H, W, 3); observed: (H, W, 2) observed flow
    t -> t+1; followed: (H, W) bool from :func:`forward_backward_check`; depth_next: (H, W) z-depth of frame t+1.
    The point at t+1 is frame t+1's point map sampled bilinearly at ``p + observed flow`` (between the surface points
    of the four pixels around it), where those four have a surface and their depths lie within DEPTH_EDGE_RELATIVE.
    """
    import cv2

    height, width = depth_next.shape
    u, v = _pixel_centres(width, height)
    qu, qv = u + observed[..., 0], v + observed[..., 1]
    depth = np.ascontiguousarray(depth_next, dtype=np.float32)
    end, inside = _sample(np.nan_to_num(points_next), qu, qv)
    # The smallest and largest of the four depths under each bilinear sample: 2x2 erosion / dilation read at its first tap.
    square = np.ones((2, 2), np.uint8)
    lo, _ = _sample(cv2.erode(depth, square, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE), qu, qv, nearest=True)
    hi, _ = _sample(cv2.dilate(depth, square, anchor=(0, 0), borderType=cv2.BORDER_REPLICATE), qu, qv, nearest=True)
    with np.errstate(invalid="ignore"):
        ok = (np.asarray(followed, bool) & inside & (lo > 0) & (hi <= lo * (1 + DEPTH_EDGE_RELATIVE))
              & np.isfinite(points_world[..., 0]))  # a point map's X, Y and Z are NaN together
    motion = end - points_world
    motion[~ok] = np.nan
    return motion


def dynamic_mask(observed: np.ndarray, rigid: np.ndarray, followed: np.ndarray, rgb: np.ndarray, rgb_next: np.ndarray) -> np.ndarray:
    """(H, W) uint8: MASK_DYNAMIC where observed and rigid flow disagree (the DYNAMIC_* and PHOTOMETRIC_WINDOW_PX
    test), MASK_STATIC where they agree, MASK_UNCHECKED where there is nothing to compare (no surface at t, the
    rigid flow leaves the frame, or the observed flow fails the forward-backward check).

    rgb, rgb_next: (H, W, 3) uint8 frames t and t+1.
    """
    import cv2

    height, width = observed.shape[:2]
    u, v = _pixel_centres(width, height)
    with np.errstate(invalid="ignore"):
        ru, rv = u + rigid[..., 0], v + rigid[..., 1]
        checked = np.asarray(followed, bool) & (ru >= 0) & (ru <= width) & (rv >= 0) & (rv <= height)  # False for NaN
        rigid2 = np.where(checked, _norm2(rigid[..., 0], rigid[..., 1]), 0)
        bound = DYNAMIC_THRESHOLD_PX + DYNAMIC_RELATIVE * np.sqrt(rigid2)
        differ = checked & (_norm2(observed[..., 0] - rigid[..., 0], observed[..., 1] - rigid[..., 1]) > bound * bound)
    if differ.any():
        here = np.ascontiguousarray(rgb, dtype=np.uint8)
        there = np.ascontiguousarray(rgb_next, dtype=np.uint8)
        window = (PHOTOMETRIC_WINDOW_PX, PHOTOMETRIC_WINDOW_PX)

        def colour_error(along: np.ndarray) -> np.ndarray:
            x = np.where(checked, u + along[..., 0], u)
            y = np.where(checked, v + along[..., 1], v)
            warped, _inside = _sample(there, x, y)
            grey = cv2.cvtColor(cv2.absdiff(here, warped), cv2.COLOR_RGB2GRAY)  # one channel: a sum over three is slow
            return cv2.blur(grey.astype(np.float32), window)

        differ &= colour_error(rigid) > colour_error(observed)
    mask = np.full((height, width), MASK_UNCHECKED, np.uint8)
    mask[checked] = MASK_STATIC
    mask[differ] = MASK_DYNAMIC
    return mask


@dataclass(frozen=True)
class PairGeometry:
    """The 4D outputs of frame t towards frame t+1 (see the module docstring for units and validity)."""

    observed: np.ndarray  # (H, W, 2) float32 pixels
    rigid: np.ndarray  # (H, W, 2) float32 pixels, NaN: unknown
    scene: np.ndarray  # (H, W, 3) float32 metres, NaN: unknown
    mask: np.ndarray  # (H, W) uint8 MASK_*
    backward: np.ndarray  # (H, W, 2) float32 observed flow t+1 -> t (for the check; not written)


def pair_geometry(estimator, rgb: np.ndarray, points_world: np.ndarray, rgb_next: np.ndarray, depth_next: np.ndarray,
                  points_next: np.ndarray, c2w_next, intrinsics_next) -> PairGeometry:
    """Everything frame t gets from frame t+1: rgb (H, W, 3) uint8 both; the point maps of both (:func:`point_map`);
    t+1's depth and camera."""
    forward, backward = estimator.forward_backward(rgb, rgb_next)
    rigid = rigid_flow(points_world, c2w_next, intrinsics_next)
    followed = forward_backward_check(forward, backward)
    return PairGeometry(
        observed=forward,
        rigid=rigid,
        scene=scene_flow(points_world, forward, followed, depth_next, points_next),
        mask=dynamic_mask(forward, rigid, followed, rgb, rgb_next),
        backward=backward,
    )


# --- observed flow estimators --------------------------------------------------------------------------------------


class DisFlow:
    """OpenCV's DIS optical flow (Kroeger et al. 2016) on grey images, on the CPU.

    The ``fast`` preset, with its finest scale chosen by the image width: the coarsest of the preset's (1/4), 1/2
    or full resolution at which the image is still DIS_FINEST_MIN_WIDTH_PX wide. The preset's 1/4 is right at
    832x480 (there it errs less than ``medium``: 0.34 against 0.68 px median end-point error on ray-cast scenes, at
    a quarter of the time), but at 320x240 it underestimates a moving object's motion by 5-7 %, at half resolution by 1 %.
    """

    name = "dis"
    DIS_FINEST_MIN_WIDTH_PX = 160

    def __init__(self, preset: str = "fast"):
        import cv2

        presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                   "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
        if preset not in presets:
            raise KeyframeWorldsError(f"unknown DIS preset {preset!r}; use one of {', '.join(presets)}")
        # One thread: this runs on the bundle's writer thread while torch's pool computes the next frame, and
        # OpenCV's own pool beside torch's spinning OpenMP threads slows both several times over.
        cv2.setNumThreads(1)
        self._cv2 = cv2
        self._dis = cv2.DISOpticalFlow_create(presets[preset])
        self._preset_finest = self._dis.getFinestScale()

    def finest_scale(self, width: int) -> int:
        scale = self._preset_finest
        while scale > 0 and width / 2**scale < self.DIS_FINEST_MIN_WIDTH_PX:
            scale -= 1
        return scale

    def _grey(self, rgb: np.ndarray) -> np.ndarray:
        return self._cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), self._cv2.COLOR_RGB2GRAY)

    def forward_backward(self, rgb: np.ndarray, rgb_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 frames t and t+1 -> ((H, W, 2) flow t -> t+1, (H, W, 2) flow t+1 -> t), float32 pixels."""
        a, b = self._grey(rgb), self._grey(rgb_next)
        self._dis.setFinestScale(self.finest_scale(a.shape[1]))
        return self._dis.calc(a, b, None), self._dis.calc(b, a, None)


class RaftFlow:
    """RAFT (Teed & Deng 2020) from torchvision, with weights from a local file (never downloaded).

    weights: a torchvision ``raft_large`` or ``raft_small`` state dict (``.pth`` / ``.pt`` read with
    ``weights_only=True``, or ``.safetensors``); which of the two is recognised from its keys.
    """

    name = "raft"
    UPDATES = 12
    MIN_SIDE_PX = 128

    def __init__(self, weights: str | os.PathLike, device: str | torch.device = "cpu"):
        try:
            from torchvision.models.optical_flow import raft_large, raft_small
        except ImportError:
            raise KeyframeWorldsError("geometry.flow 'raft' needs torchvision (pip install torchvision matching torch "
                                      f"{torch.__version__.split('+')[0]}); or use 'dis'") from None
        except Exception as exc:  # installed but broken: a build for another torch fails registering its operators
            raise KeyframeWorldsError(f"geometry.flow 'raft': torchvision is installed but does not load beside torch "
                                      f"{torch.__version__} ({type(exc).__name__}: {exc}); install the torchvision built for "
                                      "this torch, or use 'dis'") from None
        path = Path(weights)
        if not path.is_file():
            raise KeyframeWorldsError(f"RAFT weights not found: {path} (set ${RAFT_WEIGHTS_ENV} to a torchvision RAFT state dict)")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or foreign file: say which
            raise KeyframeWorldsError(f"cannot read RAFT weights {path}: {exc}") from None
        errors = []
        for build in (raft_large, raft_small):
            model = build(weights=None, progress=False)
            try:
                missing, unexpected = model.load_state_dict(state, strict=False)
            except RuntimeError as exc:  # a tensor of another shape
                errors.append(f"{build.__name__}: {str(exc).splitlines()[-1].strip()}")
                continue
            if not missing and not unexpected:
                break
            errors.append(f"{build.__name__}: {len(missing)} missing and {len(unexpected)} unexpected keys")
        else:
            raise KeyframeWorldsError(f"{path} is not a torchvision raft_large or raft_small state dict ({'; '.join(errors)})")
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def forward_backward(self, rgb: np.ndarray, rgb_next: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`DisFlow.forward_backward`; both directions in one batch of two."""
        height, width = rgb.shape[:2]
        frames = torch.from_numpy(np.stack([rgb, rgb_next])).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        # RAFT works on 1/8-resolution features and its correlation pyramid needs them 16 wide: sides a multiple of 8, 128 or more
        pad_h = max(self.MIN_SIDE_PX, height + (-height) % 8) - height
        pad_w = max(self.MIN_SIDE_PX, width + (-width) % 8) - width
        frames = torch.nn.functional.pad(frames, (0, pad_w, 0, pad_h), mode="replicate")
        first, second = frames[[0, 1]], frames[[1, 0]]
        flow = self.model(first, second, num_flow_updates=self.UPDATES)[-1][:, :, :height, :width]
        flow = flow.permute(0, 2, 3, 1).float().cpu().numpy()
        return np.ascontiguousarray(flow[0]), np.ascontiguousarray(flow[1])


def flow_estimator(method: str, device: str | torch.device = "cpu", raft_weights: str | os.PathLike | None = None):
    """The observed-flow estimator of ``geometry.flow``: ``dis``, ``raft`` (weights: ``raft_weights``, else
    ``$KEYFRAME_WORLDS_RAFT_WEIGHTS``) or ``none`` (None)."""
    if method == "none":
        return None
    if method == "dis":
        return DisFlow()
    if method == "raft":
        weights = raft_weights or os.environ.get(RAFT_WEIGHTS_ENV)
        if not weights:
            raise KeyframeWorldsError(f"geometry.flow 'raft' needs a local RAFT weights file: set ${RAFT_WEIGHTS_ENV} "
                                      "to a torchvision raft_large state dict, or use 'dis'")
        return RaftFlow(weights, device)
    raise KeyframeWorldsError(f"unknown flow method {method!r}; use dis, raft or none")


# --- per-point consistency of the fused cloud ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConsistencyCells:
    """A frame's dynamic mask counted in CONSISTENCY_CELL_PX cells: what the fused cloud needs of it, kept per frame."""

    dynamic: np.ndarray  # (h, w) uint8 dynamic pixels per cell
    checked: np.ndarray  # (h, w) uint8 checked (static or dynamic) pixels per cell

    @classmethod
    def from_mask(cls, mask: np.ndarray, cell: int = CONSISTENCY_CELL_PX) -> "ConsistencyCells":
        height, width = mask.shape
        h, w = -(-height // cell), -(-width // cell)
        padded = np.full((h * cell, w * cell), MASK_UNCHECKED, np.uint8)
        padded[:height, :width] = mask
        blocks = padded.reshape(h, cell, w, cell)
        dynamic = (blocks == MASK_DYNAMIC).sum((1, 3))
        checked = dynamic + (blocks == MASK_STATIC).sum((1, 3))
        # at most cell * cell (64) per cell: fits uint8 for cells up to 15 px
        return cls(dynamic.astype(np.uint8), checked.astype(np.uint8))

    def at_points(self, points_world: np.ndarray, c2w_opencv, intrinsics, cell: int = CONSISTENCY_CELL_PX) -> np.ndarray:
        """(N,) float32 in [0, 1] for world points (N, 3) seen by this frame's camera: the share of the checked pixels
        of the cell each projects into whose flow agrees with the geometry; 1 where nothing was checked."""
        if not len(points_world):
            return np.ones(0, np.float32)
        uv, z = project_points_opencv(points_world, np.asarray(c2w_opencv, dtype=np.float64), _k(intrinsics))
        h, w = self.dynamic.shape
        with np.errstate(invalid="ignore"):
            col, row = np.floor(uv[:, 0] / cell), np.floor(uv[:, 1] / cell)
            ok = (z > 0) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
        col = np.where(ok, col, 0).astype(np.int64)
        row = np.where(ok, row, 0).astype(np.int64)
        dynamic = self.dynamic[row, col].astype(np.float32)
        checked = self.checked[row, col].astype(np.float32)
        value = np.where(checked > 0, 1.0 - dynamic / np.maximum(checked, 1), 1.0)
        return np.where(ok, value, 1.0).astype(np.float32)
