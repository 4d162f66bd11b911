"""Lens distortion and image links: our formulas against OpenCV, COLMAP and nerfstudio files written here byte by byte.

The COLMAP files are written from COLMAP's documented layouts with ``struct``
and plain text (not by our writer), so a reader that misreads the format fails
here; OpenCV is the reference for the distortion maths.
"""

from __future__ import annotations

import json
import struct

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyframe_worlds.bridge import cameras as conv
from keyframe_worlds.bridge import formats
from keyframe_worlds.bridge.cameras import Distortion
from keyframe_worlds.bridge.errors import KeyframeWorldsError

from conftest import make_trajectory

# Realistic lenses: a wide-angle with barrel distortion and some decentring, a rational
# model as OpenCV calibrates it, fisheyes; every parameter non-zero so a swapped or dropped one shows.
LENSES = {
    "SIMPLE_PINHOLE": (),
    "PINHOLE": (),
    "SIMPLE_RADIAL": (-0.12,),
    "RADIAL": (-0.11, 0.021),
    "OPENCV": (-0.24, 0.071, 0.0012, -0.0017),
    "FULL_OPENCV": (-0.31, 0.11, 0.0011, -0.0009, -0.021, 0.052, 0.011, 0.0023),
    "OPENCV_FISHEYE": (0.052, -0.011, 0.0021, -0.00047),
    "SIMPLE_RADIAL_FISHEYE": (0.047,),
    "RADIAL_FISHEYE": (0.051, -0.0093),
}
# COLMAP's model ids (models.h) and parameter counts, written out here rather than taken from the module under test.
COLMAP_IDS = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "SIMPLE_RADIAL": 2, "RADIAL": 3, "OPENCV": 4, "OPENCV_FISHEYE": 5,
              "FULL_OPENCV": 6, "SIMPLE_RADIAL_FISHEYE": 8, "RADIAL_FISHEYE": 9}
SINGLE_FOCAL = {"SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE"}
FISHEYE = {"OPENCV_FISHEYE", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE"}


def opencv_coefficients(model: str, p: tuple) -> np.ndarray:
    """The OpenCV distCoeffs of a COLMAP model, from OpenCV's and COLMAP's documentation (independent of the module)."""
    if model in ("SIMPLE_RADIAL", "SIMPLE_RADIAL_FISHEYE"):
        return np.array([p[0], 0, 0, 0], float)
    if model in ("RADIAL", "RADIAL_FISHEYE"):
        return np.array([p[0], p[1], 0, 0], float)
    return np.array(p, float)  # OPENCV (k1 k2 p1 p2), FULL_OPENCV (k1 k2 p1 p2 k3 k4 k5 k6), OPENCV_FISHEYE (k1..k4)


def camera_matrix(model: str) -> np.ndarray:
    fy = 610.0 if model in SINGLE_FOCAL else 583.0
    return np.array([[610.0, 0, 321.5], [0, fy, 238.25], [0, 0, 1]])


def pixel_grid() -> np.ndarray:
    """Ideal pixels over a 640x480 frame, corners included: ``(221, 2)``."""
    u, v = np.meshgrid(np.linspace(0, 640, 17), np.linspace(0, 480, 13))
    return np.stack([u, v], -1).reshape(-1, 2)


DISTORTED = [m for m in LENSES if m not in ("SIMPLE_PINHOLE", "PINHOLE")]


@pytest.mark.parametrize("model", DISTORTED)
def test_distortion_matches_opencv(model):
    lens = Distortion(model, LENSES[model])
    k = camera_matrix(model)
    ideal = pixel_grid()
    coeffs = opencv_coefficients(model, LENSES[model])
    rays = np.concatenate([(ideal - k[:2, 2]) / np.diag(k)[:2], np.ones((len(ideal), 1))], 1).reshape(-1, 1, 3)
    # Forward: OpenCV projecting the ray of each ideal pixel lands where our distortion puts it.
    if model in FISHEYE:
        expected = cv2.fisheye.projectPoints(rays, np.zeros(3), np.zeros(3), k, coeffs)[0].reshape(-1, 2)
    else:
        expected = cv2.projectPoints(rays, np.zeros(3), np.zeros(3), k, coeffs)[0].reshape(-1, 2)
    distorted = conv.distort_pixels(ideal, k, lens)
    assert np.abs(distorted - ideal).max() > 5, "the test lens must distort visibly"
    np.testing.assert_allclose(distorted, expected, atol=1e-6)
    # Backward: OpenCV's undistortion of each distorted pixel agrees with ours to 1e-3 px.
    # undistortPointsIter is undistortPoints with explicit stopping criteria: its default of five
    # iterations leaves ~0.1 px at these corners, which would test OpenCV's defaults, not the maths.
    src = distorted.reshape(-1, 1, 2)
    if model in FISHEYE:
        theirs = cv2.fisheye.undistortPoints(src, k, coeffs, None, k).reshape(-1, 2)
    else:
        criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-14)
        theirs = cv2.undistortPointsIter(src, k, coeffs, None, k, criteria).reshape(-1, 2)
    ours = conv.undistort_pixels(distorted, k, lens)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    np.testing.assert_allclose(ours, ideal, atol=1e-6)


def test_plain_opencv_undistort_points_agrees_on_a_mild_lens():
    """cv2.undistortPoints itself (five iterations) where the lens is mild enough for them to converge."""
    lens = Distortion("OPENCV", (-0.05, 0.01, 0.0004, -0.0003))
    k = camera_matrix("OPENCV")
    distorted = conv.distort_pixels(pixel_grid(), k, lens)
    theirs = cv2.undistortPoints(distorted.reshape(-1, 1, 2), k, np.array(lens.params), None, k).reshape(-1, 2)
    np.testing.assert_allclose(conv.undistort_pixels(distorted, k, lens), theirs, atol=1e-3)


def test_opencv_coefficients_are_the_documented_mapping():
    for model, params in LENSES.items():
        lens = Distortion(model, params)
        expected = opencv_coefficients(model, params) if model in DISTORTED else np.zeros(8)
        got = np.array(lens.opencv_coefficients())
        np.testing.assert_array_equal(got[: len(expected)], expected)
        assert not np.any(got[len(expected):])
        assert Distortion.from_opencv_coefficients(model, got) == lens


def test_fisheye_with_zero_parameters_is_equidistant_not_pinhole():
    lens = Distortion("OPENCV_FISHEYE", (0, 0, 0, 0))
    assert not lens.is_pinhole
    xy = np.array([[1.0, 0.0]])  # 45 degrees off axis
    np.testing.assert_allclose(conv.distort_normalized(xy, lens), [[np.pi / 4, 0.0]])
    np.testing.assert_allclose(conv.undistort_normalized([[np.pi / 4, 0.0]], lens), xy)


def test_points_without_an_inverse_are_nan():
    barrel = Distortion("SIMPLE_RADIAL", (-0.3,))  # r_d = r (1 - 0.3 r^2) peaks at r_d = 0.703
    out = conv.undistort_normalized(np.array([[0.5, 0.0], [0.9, 0.0]]), barrel)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
    fisheye = Distortion("OPENCV_FISHEYE", (0, 0, 0, 0))
    assert np.isnan(conv.undistort_normalized(np.array([[2.0, 0.0]]), fisheye)).all()  # beyond 90 degrees


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(DISTORTED), st.floats(-0.6, 0.6), st.floats(-0.45, 0.45))
def test_undistort_inverts_distort(model, x, y):
    lens = Distortion(model, LENSES[model])
    xy = np.array([[x, y]])
    np.testing.assert_allclose(conv.undistort_normalized(conv.distort_normalized(xy, lens), lens), xy, atol=1e-10)


@pytest.mark.parametrize(
    "model,params,message",
    [
        ("FOV", (0.1,), "unknown camera model 'FOV'"),
        ("OPENCV", (0.1, 0.2), "OPENCV has 4 distortion parameter(s) (k1, k2, p1, p2), got 2"),
        ("RADIAL", (0.1, float("nan")), "must be finite"),
    ],
)
def test_bad_distortion_is_refused(model, params, message):
    with pytest.raises(KeyframeWorldsError) as err:
        Distortion(model, params)
    assert message in str(err.value)
