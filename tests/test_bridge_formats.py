"""Trajectory files: every upstream example reads; write then read is the identity for every format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyframe_worlds.bridge import cameras as conv
from keyframe_worlds.bridge import formats
from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.bridge.imageinfo import image_info

from conftest import example_camera_files, make_trajectory


def test_fixture_examples_are_present():
    assert len(example_camera_files()) == 5


@pytest.mark.parametrize("path", example_camera_files(), ids=lambda p: p.parent.name)
def test_read_every_upstream_example(path):
    doc = json.loads(path.read_text())
    (traj,) = formats.read_trajectories(path)
    assert formats.detect_format(path) == "worldstereo"
    assert len(traj) == len(doc["extrinsic"])
    # The file holds world-to-camera; we hold its inverse.
    np.testing.assert_allclose(conv.c2w_to_w2c(traj.c2w_opencv), np.array(doc["extrinsic"]), atol=1e-9)
    np.testing.assert_allclose(traj.fx, [k[0][0] for k in doc["intrinsic"]])
    np.testing.assert_allclose(traj.cy, [k[1][2] for k in doc["intrinsic"]])
    # Size from the file, else the image beside it: an unshifted camera has its principal point at the centre.
    if "width" in doc:
        assert (traj.width, traj.height) == (doc["width"], doc["height"])
    else:
        assert image_info(path.parent / "image.png")[1:] == (traj.width, traj.height)
    assert traj.cx[0] == pytest.approx(traj.width / 2) and traj.cy[0] == pytest.approx(traj.height / 2)
    assert traj.problems() == []


@pytest.mark.parametrize("path", example_camera_files(), ids=lambda p: p.parent.name)
@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_upstream_examples_survive_every_format(tmp_path, path, fmt):
    (traj,) = formats.read_trajectories(path)
    out = tmp_path / (fmt if fmt.startswith("colmap") else "out.json")
    formats.write_trajectories([traj], out, fmt)
    assert formats.detect_format(out) == fmt
    (back,) = formats.read_trajectories(out)
    # COLMAP stores rotations as quaternions, which orthonormalises the float32 upstream
    # rotations (2e-7 off); through w2c translations of ~15 m that moves c2w by ~2e-6.
    assert back.allclose(traj, atol=1e-5 if fmt.startswith("colmap") else 1e-9), fmt


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10_000), st.integers(1, 3), st.sampled_from(formats.FORMATS))
def test_write_then_read_is_identity(tmp_path_factory, seed, cameras, fmt):
    trajectories = [make_trajectory(f"Cam{i}", n=3 + i, seed=seed + i, width=64 + 2 * i, fps=24.0 + i) for i in range(cameras)]
    folder = tmp_path_factory.mktemp(fmt)
    out = folder / "traj.json" if fmt in ("keyframe-worlds", "nerfstudio") else folder / "out"
    formats.write_trajectories(trajectories, out, fmt)
    back = sorted(formats.read_trajectories(out), key=lambda t: t.name)
    assert len(back) == cameras
    for a, b in zip(trajectories, back):
        assert b.allclose(a, atol=1e-9), fmt


def test_colmap_file_layout(tmp_path):
    traj = make_trajectory("Shot Cam", 2, seed=9)
    formats.write_trajectories([traj], tmp_path / "sparse", "colmap")
    assert sorted(p.name for p in (tmp_path / "sparse").iterdir()) == ["cameras.txt", "images.txt", "points3D.txt"]
    lines = [l for l in (tmp_path / "sparse/images.txt").read_text().splitlines() if l and not l.startswith("#")]
    qw, qx, qy, qz, tx, ty, tz = map(float, lines[0].split()[1:8])
    w2c = conv.c2w_to_w2c(traj.c2w_opencv[0])
    np.testing.assert_allclose(conv.quaternion_wxyz_to_rotation(np.array([qw, qx, qy, qz])), w2c[:3, :3], atol=1e-12)
    np.testing.assert_allclose([tx, ty, tz], w2c[:3, 3], atol=1e-12)
    assert lines[0].split()[9:] == ["Shot", f"Cam/{traj.frames[0]:06d}.png"]
    (back,) = formats.read_trajectories(tmp_path / "sparse")
    assert back.name == "Shot Cam" and back.allclose(traj)


def test_nerfstudio_uses_opengl_camera_frame(tmp_path):
    traj = make_trajectory("Cam", 1, seed=5)
    formats.write_trajectories([traj], tmp_path / "transforms.json", "nerfstudio")
    doc = json.loads((tmp_path / "transforms.json").read_text())
    m = np.array(doc["frames"][0]["transform_matrix"])
    # OpenGL looks down -Z: its -Z column is the OpenCV forward (+Z) column.
    np.testing.assert_allclose(-m[:3, 2], traj.c2w_opencv[0, :3, 2])
    np.testing.assert_allclose(m[:3, 3], traj.c2w_opencv[0, :3, 3])


def test_generic_nerfstudio_file(tmp_path):
    doc = {"camera_model": "OPENCV", "fl_x": 500.0, "fl_y": 500.0, "cx": 320.0, "cy": 240.0, "w": 640, "h": 480,
           "frames": [{"file_path": f"images/frame_{i:05d}.png", "transform_matrix": np.eye(4).tolist()} for i in (3, 1, 2)]}
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    (traj,) = formats.read_trajectories(tmp_path)
    assert traj.frames.tolist() == [1, 2, 3] and traj.width == 640 and traj.fps == formats.DEFAULT_FPS


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"extrinsic": [np.eye(4).tolist()], "intrinsic": []}), "1 extrinsics but 0 intrinsics"),
        (json.dumps({"extrinsic": [[[1, 0], [0, 1]]], "intrinsic": [np.eye(3).tolist()]}), "must be 4x4"),
        (json.dumps({"something": 1}), "cannot tell the trajectory format"),
        (json.dumps({"extrinsic": [np.eye(4).tolist()], "intrinsic": [[[0, 0, 5], [0, 0, 5], [0, 0, 1]]]}), "fx: must be positive"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "camera.json"
    path.write_text(content)
    with pytest.raises(KeyframeWorldsError) as err:
        formats.read_trajectories(path)
    assert message in str(err.value)


def test_distortion_is_carried_not_refused(tmp_path):
    (tmp_path / "cameras.txt").write_text("1 OPENCV 64 48 50 50 32 24 0.1 0 0 0\n")
    (tmp_path / "images.txt").write_text("1 1 0 0 0 0 0 0 1 a.png\n\n")
    (traj,) = formats.read_trajectories(tmp_path)
    assert traj.distortion == (conv.Distortion("OPENCV", (0.1, 0.0, 0.0, 0.0)),) and traj.images == ("a.png",)


def test_missing_path():
    with pytest.raises(KeyframeWorldsError, match="not found"):
        formats.read_trajectories("/nonexistent/camera.json")


def test_image_info_reads_headers_not_names(tmp_path):
    from PIL import Image

    for kind, fmt in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
        path = tmp_path / f"{kind}.png"  # misnamed on purpose, like the upstream examples
        Image.new("RGB", (37, 21)).save(path, format=fmt)
        assert image_info(path) == (kind, 37, 21)
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    assert image_info(tmp_path / "junk.png") is None
    assert image_info(tmp_path / "missing.png") is None
