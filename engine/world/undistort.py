"""Undistortion of images to pinhole cameras with OpenCV, and back: the engine renders and generates pinhole views only.

A lens is a ``bridge.cameras.Distortion`` (COLMAP's models) with the frame's ``fx, fy, cx, cy``; OpenCV's
``cv2`` (pinhole family, the rational model with its eight coefficients) and ``cv2.fisheye`` (the equidistant
polynomial) hold every one of them (``Distortion.opencv_coefficients``). The pinhole chosen keeps the field of
view: every pixel of the distorted image lands inside the pinhole frame of the same size and pixel aspect
(``pinhole_keeping_fov``), so nothing the plate shows is cropped; the pinhole pixels no source pixel reaches are
marked invalid (``LensMaps.valid``). The maps are OpenCV's (``cv2.initUndistortRectifyMap`` and its
``cv2.fisheye`` twin). The way back (``distort_maps``: a generated pinhole frame as the plate's lens sees it, so it
lies on the plate pixel for pixel) undistorts every plate pixel with ``undistort_points_normalized``: OpenCV's
``initInverseRectificationMap`` does the same with a few-iteration undistortion, pixels off near the corners of a
strong lens, and has no fisheye twin.

Pixel convention: ours is continuous, the top-left pixel's centre at (0.5, 0.5) (``bridge/cameras.py``);
OpenCV puts pixel centres on integers. ``_k_opencv`` / ``_k_ours`` are the one place the half pixel is moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ...bridge import cameras
from ...bridge.cameras import MAX_PINHOLE_TAN, Distortion, Intrinsics

def _k_opencv(intr: Intrinsics) -> np.ndarray:
    """Our intrinsics -> OpenCV's 3x3 K (principal point moved by half a pixel: OpenCV's pixel centres are integers)."""
    return np.array([[intr.fx, 0.0, intr.cx - 0.5], [0.0, intr.fy, intr.cy - 0.5], [0.0, 0.0, 1.0]])


def _k_ours(k: np.ndarray, width: int, height: int) -> Intrinsics:
    """OpenCV's 3x3 K -> our intrinsics of a ``width`` x ``height`` image."""
    return Intrinsics(float(k[0, 0]), float(k[1, 1]), float(k[0, 2]) + 0.5, float(k[1, 2]) + 0.5, int(width), int(height))


def undistort_points_normalized(points_px: np.ndarray, intr: Intrinsics, distortion: Distortion) -> np.ndarray:
    """Our continuous pixels ``(N, 2)`` of the distorted camera -> ideal normalised coordinates ``(x / z, y / z)`` ``(N, 2)``.

    OpenCV's iterative undistortion run to convergence (``UNDISTORT_CRITERIA``): its default of a few iterations is
    pixels off near the corners of a strong lens.
    """
    pts = (np.asarray(points_px, dtype=np.float64) - 0.5).reshape(-1, 1, 2)
    coefficients = np.array(distortion.opencv_coefficients(), dtype=np.float64)
    if distortion.lens.fisheye:
        out = cv2.fisheye.undistortPoints(pts, _k_opencv(intr), coefficients.reshape(4, 1), R=np.eye(3),
                                          criteria=UNDISTORT_CRITERIA)
    else:
        out = cv2.undistortPointsIter(pts, _k_opencv(intr), coefficients, np.eye(3), np.eye(3), UNDISTORT_CRITERIA)
    return out.reshape(-1, 2)


UNDISTORT_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 200, 1e-14)


def pinhole_keeping_fov(intr: Intrinsics, distortion: Distortion) -> Intrinsics:
    """The pinhole, at the same size and pixel aspect, whose frame holds every pixel of the distorted image ``intr``
    (``bridge.cameras.pinhole_keeping_fov``), the plate's outline undistorted by OpenCV to convergence.
    (``cv2.getOptimalNewCameraMatrix`` with alpha 1 does the same with a few-iteration undistortion, a few
    pixels short on strong lenses.)"""
    return cameras.pinhole_keeping_fov(intr, distortion, undistort=lambda px: undistort_points_normalized(px, intr, distortion))


@dataclass(frozen=True)
class LensMaps:
    """Where each pixel of one camera comes from in the image of another (the pinhole from the distorted plate, or
    the way back).

    source_x, source_y: ``(H, W)`` float32, OpenCV pixel coordinates (``cv2.remap``'s maps; add 0.5 for ours);
    valid: ``(H, W)`` bool, the pixels a source pixel reaches.
    """

    source_x: np.ndarray
    source_y: np.ndarray
    valid: np.ndarray

    def remap(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        """``image`` (H, W[, C]) of the source camera as this one sees it; invalid pixels are 0.

        ``nearest``: take the nearest source pixel (depth, masks: no value is ever blended with a neighbour,
        so a depth edge or a pixel without depth (0) is never averaged into a surface).
        """
        interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        # Replicated, not black: a valid pixel within half a pixel of the source's edge (the plate's outline touches
        # the pinhole frame) would otherwise be blended with black.
        out = cv2.remap(np.ascontiguousarray(image), self.source_x, self.source_y, interpolation,
                        borderMode=cv2.BORDER_REPLICATE)
        out[~self.valid] = 0
        return out


def undistort_maps(intr: Intrinsics, distortion: Distortion, pinhole: Intrinsics) -> LensMaps:
    """The maps taking the distorted camera ``intr`` + ``distortion`` to the pinhole ``pinhole`` (same size)."""
    size = (pinhole.width, pinhole.height)
    coefficients = np.array(distortion.opencv_coefficients(), dtype=np.float64)
    if distortion.lens.fisheye:
        map_x, map_y = cv2.fisheye.initUndistortRectifyMap(_k_opencv(intr), coefficients.reshape(4, 1), np.eye(3),
                                                           _k_opencv(pinhole), size, cv2.CV_32FC1)
    else:
        map_x, map_y = cv2.initUndistortRectifyMap(_k_opencv(intr), coefficients, np.eye(3), _k_opencv(pinhole), size,
                                                   cv2.CV_32FC1)
    # A source position counts when its nearest pixel is inside the distorted image.
    valid = (map_x > -0.5) & (map_x < intr.width - 0.5) & (map_y > -0.5) & (map_y < intr.height - 0.5)
    valid &= np.isfinite(map_x) & np.isfinite(map_y)
    return LensMaps(map_x, map_y, valid)


def distort_maps(pinhole: Intrinsics, distortion: Distortion, intr: Intrinsics) -> LensMaps:
    """The maps taking the pinhole ``pinhole`` to the distorted camera ``intr`` + ``distortion`` (its own size): each
    plate pixel samples the pinhole pixel its ray goes through. Valid: the ray lies inside the pinhole frame (with
    ``pinhole_keeping_fov`` every plate pixel does, but a fisheye's rays past ``MAX_PINHOLE_TAN``)."""
    cols, rows = np.meshgrid(np.arange(intr.width, dtype=np.float64) + 0.5, np.arange(intr.height, dtype=np.float64) + 0.5)
    xy = undistort_points_normalized(np.stack([cols.ravel(), rows.ravel()], -1), intr, distortion)
    xy = xy.reshape(intr.height, intr.width, 2)
    k = _k_opencv(pinhole)
    map_x = (k[0, 0] * xy[..., 0] + k[0, 2]).astype(np.float32)
    map_y = (k[1, 1] * xy[..., 1] + k[1, 2]).astype(np.float32)
    valid = (map_x > -0.5) & (map_x < pinhole.width - 0.5) & (map_y > -0.5) & (map_y < pinhole.height - 0.5)
    valid &= np.isfinite(map_x) & np.isfinite(map_y)
    return LensMaps(np.where(valid, map_x, -1.0).astype(np.float32), np.where(valid, map_y, -1.0).astype(np.float32), valid)
