"""Geometry for a job: the depth estimator its ``geometry`` section configures, and the reference's depth.

- :func:`build_depth_estimator`: a learned depth network (``geometry.depth_model``) aligned to the memory
  (``world/depth_alignment.py``), else the weight-free :class:`MemoryDepthCompletion`.
- :func:`reference_depth`: the reference's z-depth and per-pixel confidence for lifting it into the memory:
  the given depth (blockout, file) where it has a surface, a learned estimate aligned to it where it has none
  (sky, unmodelled props) or for all of it when there is no depth; a flat board only as the last resort, and
  then said so (:class:`ReferenceDepth` ``warning``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...bridge.errors import KeyframeWorldsError
from ...bridge.spec import GeometryOptions
from ..world.depth import DEFAULT_DEPTH_M, DepthEstimator, MemoryDepthCompletion

DEFAULT_REFERENCE_DEPTH_M = DEFAULT_DEPTH_M  # the flat board's distance: the same default as the depth code's
#: Confidence of the flat board a reference without any depth becomes.
FLAT_BOARD_CONFIDENCE = 0.3


def build_depth_estimator(geometry: GeometryOptions, job_device: torch.device | str) -> DepthEstimator:
    """The estimator ``geometry`` asks for (its ``device``: ``auto`` is the job's device)."""
    if not geometry.depth_model:
        return MemoryDepthCompletion()
    from ..world.depth_alignment import AlignedLearnedDepth
    from ..world.learned_depth import load_depth_estimator

    device = job_device if geometry.device == "auto" else geometry.device
    return AlignedLearnedDepth(load_depth_estimator(geometry.depth_model, device=device))


@dataclass
class ReferenceDepth:
    """depth_z_m: (H, W) float32 metres, 0 = no surface (becomes the far backdrop); confidence: (H, W) or a float;
    source: in words, for the log; warning: set when the reference became a flat board; focal_px: a
    network's own focal estimate (Depth Pro), for the log beside the camera's."""

    depth_z_m: torch.Tensor
    confidence: torch.Tensor | float
    source: str
    warning: str | None = None
    focal_px: float | None = None


def reference_depth(rgb: torch.Tensor, depth_z_m: torch.Tensor | None, intrinsics: torch.Tensor,
                    estimator: DepthEstimator, flat_depth_m: float = DEFAULT_REFERENCE_DEPTH_M) -> ReferenceDepth:
    """The depth to lift the reference with. rgb: (H, W, 3) uint8; depth_z_m: (H, W) metres or None;
    intrinsics: (4,) fx, fy, cx, cy of the reference camera."""
    height, width = rgb.shape[:2]
    predictor = getattr(estimator, "predictor", None)
    if estimator.learned and predictor is not None:
        from ..world.depth_alignment import lift_reference

        known = None if depth_z_m is None else depth_z_m.to(torch.float32)
        estimate, fit = lift_reference(predictor, rgb, intrinsics=intrinsics.to(torch.float32), known_depth_z_m=known)
        depth, confidence = estimate.depth_z_m[0], estimate.confidence[0]
        if known is not None:
            # The blockout stays as rendered where it has a surface; the estimate, aligned to it, fills the rest.
            surface = known > 0
            depth = torch.where(surface, known.to(depth.device), depth)
            confidence = torch.where(surface, torch.ones_like(confidence), confidence)
            source = (f"given depth on {float(surface.float().mean()):.0%} of the pixels, the rest from the depth "
                      f"network aligned to it ({fit.source}, scale {fit.scale:.4g}, shift {fit.shift:.4g})")
        else:
            source = f"the depth network ({fit.kind}, {fit.source}, scale {fit.scale:.4g}, shift {fit.shift:.4g})"
        focal = None
        info = getattr(predictor, "info", None)
        if info is not None and info.model_type == "depth_pro":
            prediction = predictor.predict(rgb[None], intrinsics=None)
            if prediction.focal_length_px is not None:
                focal = float(prediction.focal_length_px[0])
        return ReferenceDepth(depth, confidence, source, focal_px=focal)
    if depth_z_m is not None:
        return ReferenceDepth(depth_z_m, 1.0, "the given depth")
    warning = (f"the reference has no depth and no depth model is configured (geometry.depth_model): it became a "
               f"flat board {flat_depth_m:g} m in front of the camera; give it a depth or a depth model")
    flat = torch.full((height, width), float(flat_depth_m), dtype=torch.float32, device=rgb.device)
    return ReferenceDepth(flat, FLAT_BOARD_CONFIDENCE, "a flat board (no depth)", warning=warning)



def panorama_depth(rgb: torch.Tensor, distance_m: torch.Tensor | None, estimator: DepthEstimator,
                   flat_depth_m: float = DEFAULT_REFERENCE_DEPTH_M) -> ReferenceDepth:
    """The depth to lift an equirectangular reference with (``bridge/panorama.py``): a ReferenceDepth whose
    ``depth_z_m`` holds the distance along each pixel's ray instead (the panorama's depth, 0 = no surface).

    rgb: (H, W, 3) uint8 panorama; distance_m: its (H, W) depth map (the add-on's panoramic render) or None.
    Without one: a learned estimator's depth on cube faces aligned to one another
    (``world/panorama.panorama_distance_from_faces``), else a sphere ``flat_depth_m`` around the camera, said so.
    """
    height, width = rgb.shape[:2]
    if distance_m is not None:
        return ReferenceDepth(distance_m, 1.0, "the given panorama depth (distance along each ray)")
    predictor = getattr(estimator, "predictor", None)
    if estimator.learned and predictor is not None:
        import numpy as np

        from ..world.depth_alignment import lift_reference
        from ..world.panorama import panorama_distance_from_faces

        failed: list[str] = []

        def face_depth(image: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            face = torch.from_numpy(image).to(rgb.device)
            try:
                estimate, _fit = lift_reference(predictor, face, intrinsics=torch.as_tensor(k, dtype=torch.float32, device=rgb.device))
            except KeyframeWorldsError:  # nothing predicted on this face (a blank sky): the other faces still count
                failed.append(str(len(failed)))
                return np.zeros(image.shape[:2], np.float32), np.zeros(image.shape[:2], np.float32)
            return estimate.depth_z_m[0].cpu().numpy(), estimate.confidence[0].cpu().numpy()

        distance, confidence, fits = panorama_distance_from_faces(rgb.cpu().numpy(), face_depth)
        covered = distance > 0
        if covered.any():
            scales = ", ".join(f"{f.face} {f.scale:.3g}" for f in fits)
            source = f"the depth network on 6 cube faces aligned to one another (scales {scales})"
            if not covered.all():
                # Faces the network saw nothing on: at the typical distance of the others, trusted as little as a board.
                distance = np.where(covered, distance, np.median(distance[covered])).astype(np.float32)
                confidence = np.where(covered, confidence, FLAT_BOARD_CONFIDENCE).astype(np.float32)
                source += f"; {len(failed)} face(s) without a prediction at the median distance"
            return ReferenceDepth(torch.from_numpy(distance).to(rgb.device), torch.from_numpy(confidence).to(rgb.device), source)
    why = ("the depth network predicted nothing on any of its cube faces" if estimator.learned and predictor is not None
           else "no depth model is configured (geometry.depth_model)")
    warning = (f"the panorama reference has no depth and {why}: it became a sphere {flat_depth_m:g} m around the "
               f"camera; give it a depth or a depth model")
    flat = torch.full((height, width), float(flat_depth_m), dtype=torch.float32, device=rgb.device)
    return ReferenceDepth(flat, FLAT_BOARD_CONFIDENCE, "a sphere (no depth)", warning=warning)
