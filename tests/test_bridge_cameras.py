"""Camera conventions: round trips, projection against direct pinhole maths, Blender intrinsics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from keyframe_worlds.bridge import cameras as conv
from keyframe_worlds.bridge.errors import KeyframeWorldsError

finite = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False)
quaternions = arrays(np.float64, 4, elements=st.floats(-1, 1)).filter(lambda q: np.linalg.norm(q) > 0.1)


def rigid_from(q: np.ndarray, t: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = conv.quaternion_wxyz_to_rotation(q)
    m[:3, 3] = t
    return m


@settings(max_examples=200, deadline=None)
@given(quaternions, arrays(np.float64, 3, elements=finite))
def test_blender_opencv_round_trip_and_inverse(q, t):
    c2w_blender = rigid_from(q, t)
    c2w_cv = conv.c2w_blender_to_opencv(c2w_blender)
    np.testing.assert_allclose(conv.c2w_opencv_to_blender(c2w_cv), c2w_blender, atol=1e-12)
    # Same camera centre; forward axis of OpenCV is Blender's -Z, down is Blender's -Y.
    np.testing.assert_allclose(c2w_cv[:3, 3], c2w_blender[:3, 3])
    np.testing.assert_allclose(c2w_cv[:3, 2], -c2w_blender[:3, 2], atol=1e-12)
    np.testing.assert_allclose(c2w_cv[:3, 1], -c2w_blender[:3, 1], atol=1e-12)
    w2c = conv.c2w_to_w2c(c2w_cv)
    np.testing.assert_allclose(w2c @ c2w_cv, np.eye(4), atol=1e-9)
    np.testing.assert_allclose(conv.w2c_to_c2w(w2c), c2w_cv, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(quaternions)
def test_quaternion_round_trip(q):
    r = conv.quaternion_wxyz_to_rotation(q)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    q2 = conv.rotation_to_quaternion_wxyz(r)
    assert q2[0] >= 0
    np.testing.assert_allclose(conv.quaternion_wxyz_to_rotation(q2), r, atol=1e-9)
    qn = q / np.linalg.norm(q)
    assert min(np.abs(q2 - qn).max(), np.abs(q2 + qn).max()) < 1e-9


@settings(max_examples=200, deadline=None)
@given(
    quaternions,
    arrays(np.float64, 3, elements=finite),
    arrays(np.float64, (20, 3), elements=finite),
    st.floats(10, 5000),
    st.floats(10, 5000),
    st.floats(-500, 2500),
    st.floats(-500, 2500),
)
def test_projection_matches_direct_pinhole(q, t, points, fx, fy, cx, cy):
    c2w = rigid_from(q, t)
    k = conv.intrinsics_matrix(fx, fy, cx, cy)
    uv, z = conv.project_points_opencv(points, c2w, k)
    # Direct maths: camera coordinates by solving R x + t = p, then u = fx x/z + cx.
    r, tr = c2w[:3, :3], c2w[:3, 3]
    cam = np.linalg.solve(r, (points - tr).T).T
    np.testing.assert_allclose(z, cam[:, 2], atol=1e-9)
    front = cam[:, 2] > 1e-3
    np.testing.assert_allclose(uv[front, 0], fx * cam[front, 0] / cam[front, 2] + cx, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(uv[front, 1], fy * cam[front, 1] / cam[front, 2] + cy, rtol=1e-9, atol=1e-6)
    back = conv.unproject_pixels_opencv(uv[front], z[front], c2w, k)
    np.testing.assert_allclose(back, points[front], atol=1e-6)


def test_known_blender_intrinsics():
    k = conv.intrinsics_from_blender(lens_mm=50, sensor_width_mm=36, sensor_height_mm=24, sensor_fit="AUTO",
                                     shift_x=0, shift_y=0, resolution_x=1920, resolution_y=1080)
    assert (k.width, k.height) == (1920, 1080)
    assert k.fx == pytest.approx(50 * 1920 / 36) and k.fy == pytest.approx(k.fx)
    assert (k.cx, k.cy) == (960.0, 540.0)


def test_resolution_percentage_is_integer_arithmetic():
    k = conv.intrinsics_from_blender(lens_mm=35, sensor_width_mm=36, sensor_height_mm=24, sensor_fit="AUTO",
                                     shift_x=0, shift_y=0, resolution_x=1001, resolution_y=501, resolution_percentage=33)
    assert (k.width, k.height) == (1001 * 33 // 100, 501 * 33 // 100)
    assert k.fx == pytest.approx(35 * k.width / 36)


def test_auto_fit_portrait_uses_sensor_width_on_the_vertical():
    k = conv.intrinsics_from_blender(lens_mm=50, sensor_width_mm=36, sensor_height_mm=24, sensor_fit="AUTO",
                                     shift_x=0, shift_y=0, resolution_x=1080, resolution_y=1920)
    assert k.fy == pytest.approx(50 * 1920 / 36)
    v = conv.intrinsics_from_blender(lens_mm=50, sensor_width_mm=36, sensor_height_mm=24, sensor_fit="VERTICAL",
                                     shift_x=0, shift_y=0, resolution_x=1920, resolution_y=1080)
    assert v.fy == pytest.approx(50 * 1080 / 24)


def test_shift_and_pixel_aspect():
    k = conv.intrinsics_from_blender(lens_mm=50, sensor_width_mm=36, sensor_height_mm=24, sensor_fit="HORIZONTAL",
                                     shift_x=0.1, shift_y=-0.05, resolution_x=800, resolution_y=600,
                                     pixel_aspect_x=2.0, pixel_aspect_y=1.0)
    # Wide pixels: fewer pixels per unit angle horizontally.
    assert k.fy == pytest.approx(2 * k.fx)
    assert k.cx == pytest.approx(400 - 0.1 * 800)
    # Shift is a fraction of the spanned width, converted to (taller) vertical pixels.
    assert k.cy == pytest.approx(300 + (-0.05) * 800 * 2)


@pytest.mark.parametrize("bad", [dict(lens_mm=0), dict(sensor_width_mm=-1), dict(pixel_aspect_x=math.nan), dict(sensor_fit="DIAGONAL")])
def test_bad_blender_values_are_named(bad):
    kwargs = dict(lens_mm=50, sensor_width_mm=36, sensor_height_mm=24, sensor_fit="AUTO", shift_x=0, shift_y=0,
                  resolution_x=100, resolution_y=100)
    kwargs.update(bad)
    with pytest.raises(KeyframeWorldsError) as err:
        conv.intrinsics_from_blender(**kwargs)
    assert next(iter(bad)) in str(err.value)


def test_split_scale_removes_scale():
    rng = np.random.default_rng(3)
    m = rigid_from(rng.normal(size=4), rng.normal(size=3))
    scaled = m.copy()
    scaled[:3, :3] = m[:3, :3] * np.array([2.0, 3.0, 0.5])
    rigid, scale = conv.split_scale(scaled)
    np.testing.assert_allclose(rigid, m, atol=1e-12)
    np.testing.assert_allclose(scale, [2.0, 3.0, 0.5])


def test_intrinsics_scaled_to():
    k = conv.Intrinsics(100, 120, 32, 24, 64, 48).scaled_to(128, 96)
    assert (k.fx, k.fy, k.cx, k.cy, k.width, k.height) == (200, 240, 64, 48, 128, 96)
