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
from keyframe_worlds.bridge.sparse import SparsePoints
from keyframe_worlds.bridge.trajectory import Trajectory, validate_trajectory_json

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


# --- COLMAP models written here from the documented layouts ------------------------------


def colmap_fixture(model: str) -> dict:
    """A small model: a camera of ``model`` and a PINHOLE one, three images, three points with tracks."""
    rng = np.random.default_rng(COLMAP_IDS[model])
    focal = (610.0,) if model in SINGLE_FOCAL else (610.0, 583.0)
    cameras = [(3, model, 640, 480, focal + (321.5, 238.25) + LENSES[model]), (7, "PINHOLE", 640, 480, (500.0, 510.0, 320.0, 240.0))]

    def pose():
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        return tuple((q if q[0] > 0 else -q).tolist()), tuple(rng.uniform(-5, 5, 3).tolist())

    # (id, qvec, tvec, camera id, NAME, POINTS2D as (x, y, point3D id)).
    images = [
        (12, *pose(), 3, "dslr/DSC_0012.JPG", [(10.5, 20.25, 101), (33.0, 44.0, -1), (50.0, 60.0, 102)]),
        (15, *pose(), 3, "dslr/DSC_0015.JPG", [(11.5, 21.25, 102), (70.0, 80.0, 101)]),
        (4, *pose(), 7, "left/000007.png", [(1.0, 2.0, 101), (5.0, 6.0, -1), (7.0, 8.0, -1), (9.5, 9.75, 103)]),
    ]
    # (id, xyz, rgb, error, track as (image id, point2D index)).
    points = [
        (101, (0.5, -1.25, 3.0), (255, 0, 17), 0.75, [(12, 0), (15, 1), (4, 0)]),
        (102, (-2.0, 0.125, 5.5), (1, 2, 3), 1.5, [(12, 2), (15, 0)]),
        (103, (4.0, 4.5, -0.25), (200, 201, 202), 0.0625, [(4, 3)]),
    ]
    return {"cameras": cameras, "images": images, "points": points}


def write_colmap_text(folder, fx: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cameras.txt", "w") as f:
        f.write("# Camera list with one line of data per camera:\n")
        for cid, model, w, h, params in fx["cameras"]:
            f.write(f"{cid} {model} {w} {h} {' '.join(repr(p) for p in params)}\n")
    with open(folder / "images.txt", "w") as f:
        f.write("# Image list with two lines of data per image:\n")
        for iid, q, t, cid, name, pts in fx["images"]:
            f.write(f"{iid} {' '.join(map(repr, q + t))} {cid} {name}\n")
            f.write(" ".join(f"{x!r} {y!r} {p}" for x, y, p in pts) + "\n")
    with open(folder / "points3D.txt", "w") as f:
        f.write("# 3D point list with one line of data per point:\n")
        for pid, xyz, rgb, err, track in fx["points"]:
            f.write(f"{pid} {' '.join(map(repr, xyz))} {' '.join(map(str, rgb))} {err!r} {' '.join(f'{i} {j}' for i, j in track)}\n")


def write_colmap_binary(folder, fx: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cameras.bin", "wb") as f:
        f.write(struct.pack("<Q", len(fx["cameras"])))
        for cid, model, w, h, params in fx["cameras"]:
            f.write(struct.pack("<IiQQ", cid, COLMAP_IDS[model], w, h) + struct.pack(f"<{len(params)}d", *params))
    with open(folder / "images.bin", "wb") as f:
        f.write(struct.pack("<Q", len(fx["images"])))
        for iid, q, t, cid, name, pts in fx["images"]:
            f.write(struct.pack("<I", iid) + struct.pack("<4d", *q) + struct.pack("<3d", *t) + struct.pack("<I", cid))
            f.write(name.encode() + b"\x00" + struct.pack("<Q", len(pts)))
            for x, y, p in pts:
                f.write(struct.pack("<ddQ", x, y, 2**64 - 1 if p < 0 else p))
    with open(folder / "points3D.bin", "wb") as f:
        f.write(struct.pack("<Q", len(fx["points"])))
        for pid, xyz, rgb, err, track in fx["points"]:
            f.write(struct.pack("<Q", pid) + struct.pack("<3d", *xyz) + struct.pack("<3B", *rgb) + struct.pack("<d", err))
            f.write(struct.pack("<Q", len(track)) + b"".join(struct.pack("<II", i, j) for i, j in track))


def read_cameras_bin_independently(path) -> list[tuple]:
    data = path.read_bytes()
    (n,), off, out = struct.unpack_from("<Q", data), 8, []
    counts = {0: 3, 1: 4, 2: 4, 3: 5, 4: 8, 5: 8, 6: 12, 8: 4, 9: 5}
    for _ in range(n):
        cid, mid, w, h = struct.unpack_from("<IiQQ", data, off)
        off += 24
        params = struct.unpack_from(f"<{counts[mid]}d", data, off)
        off += 8 * counts[mid]
        out.append((cid, mid, w, h, params))
    assert off == len(data)
    return out


def check_fixture_read(tset, fx: dict) -> None:
    """The trajectory set holds exactly what the fixture wrote: lenses, names, poses and points."""
    by_name = {name: (iid, q, t, cid, pts) for iid, q, t, cid, name, pts in fx["images"]}
    cams = {cid: (model, params) for cid, model, _, _, params in fx["cameras"]}
    frame_names = {}
    for traj in tset.trajectories:
        for i, frame in enumerate(traj.frames.tolist()):
            name = traj.images[i] or f"{traj.name}/{frame:06d}.png"
            frame_names[traj.name, frame] = name
            iid, q, t, cid, _ = by_name[name]
            model, params = cams[cid]
            single = model in SINGLE_FOCAL
            intr = (traj.fx[i], traj.cx[i], traj.cy[i]) if single else (traj.fx[i], traj.fy[i], traj.cx[i], traj.cy[i])
            assert intr == params[: len(intr)]
            if single:
                assert traj.fy[i] == traj.fx[i]
            d = traj.distortion[i]
            assert (d is None) if model == "PINHOLE" else (d.model, d.params) == (model, params[len(intr):])
            w2c = conv.c2w_to_w2c(traj.c2w_opencv[i])
            np.testing.assert_allclose(w2c[:3, :3], conv.quaternion_wxyz_to_rotation(np.array(q)), atol=1e-12)
            np.testing.assert_allclose(w2c[:3, 3], t, atol=1e-12)
    assert sorted(frame_names.values()) == sorted(by_name)
    pts = tset.points
    assert pts is not None and len(pts) == len(fx["points"])
    id_of_name = {name: iid for iid, _, _, _, name, _ in fx["images"]}
    for i, (pid, xyz, rgb, err, track) in enumerate(fx["points"]):
        assert pts.ids[i] == pid and tuple(pts.xyz[i]) == xyz and tuple(pts.rgb[i]) == rgb and pts.error[i] == err
        assert [(id_of_name[frame_names[view]], j) for view, j in pts.track(i)] == track
    for view, keypoints in zip(pts.views, pts.keypoints):
        expected = by_name[frame_names[view]][4]
        np.testing.assert_array_equal(keypoints, [(x, y) for x, y, _ in expected])


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
@pytest.mark.parametrize("model", list(LENSES))
def test_colmap_models_read_and_write_back(tmp_path, model, binary):
    fx = colmap_fixture(model)
    (write_colmap_binary if binary else write_colmap_text)(tmp_path / "sparse", fx)
    fmt = "colmap-binary" if binary else "colmap"
    assert formats.detect_format(tmp_path / "sparse") == fmt
    tset = formats.read_trajectory_set(tmp_path / "sparse")
    check_fixture_read(tset, fx)
    assert {t.name for t in tset.trajectories} == {"dslr", "left"}
    assert [t.frames.tolist() for t in tset.trajectories] == [[12, 15], [7]]
    # Generated-looking names carry camera and frame and need no image path; others keep theirs.
    assert tset.trajectories[0].images == ("dslr/DSC_0012.JPG", "dslr/DSC_0015.JPG") and tset.trajectories[1].images == (None,)
    for out_fmt in ("colmap", "colmap-binary"):
        out = tmp_path / out_fmt
        formats.write_trajectory_set(tset, out, out_fmt)
        back = formats.read_trajectory_set(out)
        assert [b.allclose(a, atol=1e-12) for a, b in zip(tset.trajectories, back.trajectories)] == [True, True]
        assert back.points == tset.points
        check_fixture_read(back, fx)  # images are renumbered; the check goes by names
    # POINTS2D as written name the same 3D points as the fixture's (they are rebuilt from the tracks).
    lines = [l for l in (tmp_path / "colmap" / "images.txt").read_text().splitlines() if not l.startswith("#")]
    written = {lines[i].split()[9]: lines[i + 1].split() for i in range(0, len(lines), 2)}
    for _, _, _, _, name, pts in fx["images"]:
        assert written[name] == [v for x, y, p in pts for v in (repr(x), repr(y), str(p))]
    # The binary cameras file as COLMAP lays it out, read here without our reader.
    formats.write_trajectory_set(tset, tmp_path / "bin", "colmap-binary")
    cams = read_cameras_bin_independently(tmp_path / "bin" / "cameras.bin")
    assert (COLMAP_IDS[model], fx["cameras"][0][4]) in [(mid, params) for _, mid, _, _, params in cams]


# --- nerfstudio / instant-ngp ------------------------------------------------------------

# What nerfstudio's colmap_to_json writes for each COLMAP model (its process_data/colmap_utils.py):
# camera_model and k1 k2 k3 k4 p1 p2, zero where the model has no such term.
NERFSTUDIO_OF = {
    "SIMPLE_RADIAL": ("OPENCV", {"k1": -0.12}),
    "RADIAL": ("OPENCV", {"k1": -0.11, "k2": 0.021}),
    "OPENCV": ("OPENCV", {"k1": -0.24, "k2": 0.071, "p1": 0.0012, "p2": -0.0017}),
    "OPENCV_FISHEYE": ("OPENCV_FISHEYE", {"k1": 0.052, "k2": -0.011, "k3": 0.0021, "k4": -0.00047}),
    "SIMPLE_RADIAL_FISHEYE": ("OPENCV_FISHEYE", {"k1": 0.047}),
    "RADIAL_FISHEYE": ("OPENCV_FISHEYE", {"k1": 0.051, "k2": -0.0093}),
}


def nerfstudio_doc(camera_model: str, k: dict, fl=(610.0, 583.0), per_frame: bool = False) -> dict:
    lens = {"camera_model": camera_model, "fl_x": fl[0], "fl_y": fl[1], "cx": 321.5, "cy": 238.25, "w": 640, "h": 480,
            **{key: k.get(key, 0.0) for key in ("k1", "k2", "k3", "k4", "p1", "p2")}}
    frames = [{"file_path": f"images/frame_{i:05d}.jpg", "transform_matrix": np.eye(4).tolist()} for i in (1, 2, 3)]
    if per_frame:
        for f in frames:
            f.update({key: v for key, v in lens.items() if key != "camera_model"})
        return {"camera_model": camera_model, "frames": frames}
    return {**lens, "frames": frames}


@pytest.mark.parametrize("per_frame", [False, True], ids=["top-level", "per-frame"])
@pytest.mark.parametrize("model", list(NERFSTUDIO_OF))
def test_nerfstudio_distortion_reads_as_the_plainest_colmap_model(tmp_path, model, per_frame):
    camera_model, k = NERFSTUDIO_OF[model]
    (tmp_path / "transforms.json").write_text(json.dumps(nerfstudio_doc(camera_model, k, per_frame=per_frame)))
    (traj,) = formats.read_trajectories(tmp_path)
    # Without our model name beside it, a nerfstudio file reads as the model its parameters need.
    plain = {"OPENCV": "OPENCV", "OPENCV_FISHEYE": "OPENCV_FISHEYE"}[camera_model]
    expected = Distortion.from_opencv_coefficients(plain, Distortion(model, LENSES[model]).opencv_coefficients())
    assert traj.distortion == (expected,) * 3
    assert traj.images == ("images/frame_00001.jpg", "images/frame_00002.jpg", "images/frame_00003.jpg")


@pytest.mark.parametrize("model", list(NERFSTUDIO_OF) + ["PINHOLE", "SIMPLE_PINHOLE"])
def test_colmap_to_nerfstudio_and_back_keeps_the_model(tmp_path, model):
    fx = colmap_fixture(model)
    write_colmap_binary(tmp_path / "sparse", fx)
    tset = formats.read_trajectory_set(tmp_path / "sparse")
    if model in FISHEYE:
        # The fixture's second camera is a PINHOLE, and a nerfstudio file has one camera_model.
        with pytest.raises(KeyframeWorldsError, match="one camera_model per file: camera 'dslr' is OPENCV_FISHEYE, camera 'left' is OPENCV"):
            formats.write_trajectory_set(tset, tmp_path / "transforms.json", "nerfstudio")
        tset = tset.select(["dslr"])
    formats.write_trajectory_set(tset, tmp_path / "transforms.json", "nerfstudio")
    doc = json.loads((tmp_path / "transforms.json").read_text())
    if model in NERFSTUDIO_OF:
        camera_model, k = NERFSTUDIO_OF[model]
        assert doc["camera_model"] == camera_model
        dslr = [f for f in doc["frames"] if f["keyframe_worlds_camera"] == "dslr"]
        keys = ("k1", "k2", "k3", "k4", "p1", "p2")
        for f in dslr:  # per frame where the cameras differ, else at the top level, as nerfstudio reads them
            assert {key: f.get(key, doc.get(key)) for key in keys} == {key: k.get(key, 0.0) for key in keys}
            assert f.get("keyframe_worlds_camera_model", doc.get("keyframe_worlds_camera_model")) == model
    expected_names = ["dslr/DSC_0012.JPG", "dslr/DSC_0015.JPG"] + ([] if model in FISHEYE else ["images/left/000007.png"])
    assert sorted(f["file_path"] for f in doc["frames"]) == expected_names
    back = formats.read_trajectory_set(tmp_path / "transforms.json")
    assert len(back.trajectories) == len(tset.trajectories)
    assert all(b.allclose(a, atol=1e-12) for a, b in zip(tset.trajectories, back.trajectories))
    assert back.points is None  # nerfstudio's transforms.json holds no points
    formats.write_trajectory_set(back, tmp_path / "again", "colmap-binary")
    again = formats.read_trajectory_set(tmp_path / "again")
    assert all(b.allclose(a, atol=1e-12) for a, b in zip(tset.trajectories, again.trajectories))


def test_nerfstudio_hoists_only_shared_values(tmp_path):
    """nerfstudio uses a top-level value for every frame, so only values all frames share go there."""
    a = make_trajectory("A", 3, seed=1)
    lens = Distortion("OPENCV", (-0.1, 0.01, 0.001, 0.002))
    a = type(a)(**{**a.__dict__, "cx": np.full(3, 32.0), "distortion": lens})
    formats.write_trajectories([a], tmp_path / "t.json", "nerfstudio")
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["cx"] == 32.0 and doc["k1"] == -0.1 and doc["p2"] == 0.002 and doc["keyframe_worlds_camera_model"] == "OPENCV"
    assert "fl_x" not in doc and all("fl_x" in f and "cx" not in f and "k1" not in f for f in doc["frames"])
    (back,) = formats.read_trajectories(tmp_path / "t.json")
    assert back.allclose(a, atol=0)


def test_instant_ngp_is_fisheye(tmp_path):
    doc = nerfstudio_doc("OPENCV_FISHEYE", {"k1": 0.05})
    del doc["camera_model"]
    doc["is_fisheye"] = True
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    (traj,) = formats.read_trajectories(tmp_path)
    assert traj.distortion[0] == Distortion("OPENCV_FISHEYE", (0.05, 0, 0, 0))


def test_image_names_survive_every_format_that_holds_them(tmp_path):
    """images/0001.jpg stays images/0001.jpg, and a COLMAP NAME stays itself, through every conversion."""
    traj = make_trajectory("Cam", 3, seed=4)
    traj = type(traj)(**{**traj.__dict__, "images": ("images/0001.jpg", None, "orig/IMG_7.JPG")})
    for fmt in formats.FORMATS:
        out = tmp_path / fmt
        formats.write_trajectories([traj], out if fmt.startswith("colmap") else out.with_suffix(".json"), fmt)
        (back,) = formats.read_trajectories(out if fmt.startswith("colmap") else out.with_suffix(".json"))
        assert back.images == traj.images and back.frames.tolist() == traj.frames.tolist() and back.name == "Cam", fmt
    names = [l.split()[9] for l in (tmp_path / "colmap/images.txt").read_text().splitlines()[::1] if l and not l.startswith("#")
             and len(l.split()) > 9]
    assert names == ["images/0001.jpg", f"Cam/{traj.frames[1]:06d}.png", "orig/IMG_7.JPG"]


# --- refusals ----------------------------------------------------------------------------


def distorted(model: str = "OPENCV", n: int = 3, name: str = "Cam"):
    traj = make_trajectory(name, n, seed=2)
    return type(traj)(**{**traj.__dict__, "fy": traj.fx, "distortion": Distortion(model, LENSES[model])})


@pytest.mark.parametrize(
    "traj,fmt,message",
    [
        (distorted("OPENCV"), "worldstereo",
         "camera 'Cam' frame {f}: camera model OPENCV cannot be written as worldstereo: camera.json holds pinhole cameras only"),
        (distorted("RADIAL_FISHEYE"), "worldstereo", "camera model RADIAL_FISHEYE cannot be written as worldstereo"),
        (distorted("FULL_OPENCV"), "nerfstudio",
         "camera 'Cam' frame {f}: camera model FULL_OPENCV cannot be written as nerfstudio: its OPENCV model has no rational terms"),
        (type(distorted())(**{**distorted("RADIAL").__dict__, "fy": distorted().fx * 1.01}), "colmap-binary",
         "camera 'Cam' frame {f}: camera model RADIAL cannot be written as colmap-binary: it has one focal length, but fx="),
    ],
)
def test_formats_that_cannot_hold_a_model_say_so(tmp_path, traj, fmt, message):
    with pytest.raises(KeyframeWorldsError) as err:
        formats.write_trajectories([traj], tmp_path / "out.json", fmt)
    assert message.format(f=traj.frames[0]) in str(err.value) and "\n" not in str(err.value)


def test_pinhole_equivalent_lenses_go_to_worldstereo(tmp_path):
    traj = type(distorted())(**{**distorted().__dict__, "distortion": Distortion("OPENCV", (0, 0, 0, 0))})
    formats.write_trajectories([traj], tmp_path / "camera.json", "worldstereo")
    (back,) = formats.read_trajectories(tmp_path / "camera.json")
    assert back.distortion == (None,) * 3 and np.allclose(back.c2w_opencv, traj.c2w_opencv)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_unsupported_colmap_model_is_named(tmp_path, binary):
    if binary:
        (tmp_path / "cameras.bin").write_bytes(struct.pack("<Q", 1) + struct.pack("<IiQQ", 5, 7, 64, 48) + struct.pack("<5d", 50, 50, 32, 24, 0.9))
        (tmp_path / "images.bin").write_bytes(struct.pack("<Q", 0))
    else:
        (tmp_path / "cameras.txt").write_text("5 FOV 64 48 50 50 32 24 0.9\n")
        (tmp_path / "images.txt").write_text("")
    with pytest.raises(KeyframeWorldsError, match="camera 5 uses the COLMAP camera model FOV, which is not supported"):
        formats.read_trajectories(tmp_path)


@pytest.mark.parametrize(
    "doc,message",
    [
        (nerfstudio_doc("OPENCV", {"k4": 0.01}), "k4=0.01 (nerfstudio's r^8 radial term) has no COLMAP camera model"),
        (nerfstudio_doc("OPENCV_FISHEYE", {"p1": 0.01}), "camera_model OPENCV_FISHEYE has no tangential terms"),
        (nerfstudio_doc("PINHOLE", {"k1": 0.01}), "camera_model PINHOLE cannot have distortion (k1=0.01)"),
        (nerfstudio_doc("EQUIRECTANGULAR", {}), "camera_model 'EQUIRECTANGULAR' is not supported"),
        ({**nerfstudio_doc("OPENCV", {"k1": 0.1, "k2": 0.2}), "keyframe_worlds_camera_model": "SIMPLE_RADIAL"}, "SIMPLE_RADIAL has no k2=0.2"),
    ],
)
def test_nerfstudio_lenses_we_cannot_carry(tmp_path, doc, message):
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    with pytest.raises(KeyframeWorldsError) as err:
        formats.read_trajectories(tmp_path)
    assert message in str(err.value)


def test_truncated_binary_model(tmp_path):
    write_colmap_binary(tmp_path, colmap_fixture("OPENCV"))
    data = (tmp_path / "images.bin").read_bytes()
    (tmp_path / "images.bin").write_bytes(data[:-5])
    with pytest.raises(KeyframeWorldsError, match="images.bin: truncated in image record 2"):
        formats.read_trajectories(tmp_path)


def test_single_focal_model_needs_equal_focal_lengths():
    traj = distorted("SIMPLE_RADIAL")
    doc = traj.to_json()
    doc["frames"][1]["fy"] = doc["frames"][1]["fx"] + 1
    problems = validate_trajectory_json(doc)
    assert [str(p) for p in problems] == [f"trajectory.frames[1].fy: must equal fx for SIMPLE_RADIAL, which has one focal length "
                                          f"(fx={doc['frames'][1]['fx']!r}, fy={doc['frames'][1]['fy']!r})"]


def test_job_validation_accepts_distorted_and_fisheye_cameras(tmp_path):
    # The engine undistorts them (engine/run/lens.py, tests/test_undistort_jobs.py); a bad lens is still named.
    from PIL import Image

    from keyframe_worlds.bridge import spec

    Image.new("RGB", (64, 48)).save(tmp_path / "ref.png")
    doc = {"version": 1, "name": "j", "generator": "preview", "reference": {"image": "ref.png"},
           "trajectories": [make_trajectory("Plain", 2).to_json(), distorted("OPENCV", 3).to_json()]}
    assert spec.validate_job(doc, base_dir=tmp_path) == []
    doc["trajectories"][1] = type(distorted())(**{**distorted().__dict__, "distortion": Distortion("OPENCV_FISHEYE", (0, 0, 0, 0))}).to_json()
    assert spec.validate_job(doc, base_dir=tmp_path) == []
    doc["trajectories"][1]["frames"][0]["distortion"]["params"] = [0.1]
    assert [p.path for p in spec.validate_job(doc, base_dir=tmp_path)] == ["trajectories[1].frames[0].distortion.params"]


def test_old_trajectory_json_without_lens_or_image_still_reads():
    traj = make_trajectory("Cam", 2)
    doc = traj.to_json()
    assert all(set(f) == {"frame", "c2w_opencv", "fx", "fy", "cx", "cy"} for f in doc["frames"])
    back = Trajectory.from_json(doc)
    assert back == traj and back.distortion == (None, None) and back.images == (None, None)
    for f in doc["frames"]:  # null is the same as leaving the key out
        f.update(distortion=None, image=None)
    assert Trajectory.from_json(doc) == traj


# --- round trips of anything the formats hold ----------------------------------------------


def random_points(rng: np.random.Generator, trajectories) -> SparsePoints:
    """Points whose tracks use distinct keypoints of a random subset of the frames (views in trajectory order)."""
    views = [(t.name, int(f)) for t in trajectories for f in t.frames if rng.random() < 0.7]
    keypoints = [rng.uniform(0, 64, (int(rng.integers(1, 6)), 2)) for _ in views]
    pairs = [(v, k) for v in range(len(views)) for k in range(len(keypoints[v]))]
    rng.shuffle(pairs)
    n = int(rng.integers(0, 8))
    cuts = np.sort(rng.integers(0, len(pairs) + 1, n - 1)) if n > 1 else np.zeros(0, int)
    offsets = np.concatenate([[0], cuts, [len(pairs)]]) if n else np.zeros(1, int)
    pairs = pairs[: offsets[-1]]
    return SparsePoints(rng.normal(size=(n, 3)) * 10, rng.integers(0, 256, (n, 3)), rng.uniform(0, 2, n),
                        rng.choice(10_000, n, replace=False), offsets,
                        [v for v, _ in pairs], [k for _, k in pairs], tuple(views), tuple(keypoints))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10_000), st.sampled_from(list(LENSES)), st.sampled_from(formats.FORMATS), st.booleans())
def test_lenses_images_and_points_round_trip(tmp_path_factory, seed, model, fmt, with_images):
    rng = np.random.default_rng(seed)
    trajectories = []
    for c in range(2):
        traj = make_trajectory(f"Cam{c}", 3 + c, seed=seed + c)
        # An animated lens: each frame's parameters scaled differently, some frames plain pinholes.
        lenses = [Distortion(model, tuple(np.array(LENSES[model]) * rng.uniform(0.2, 1.5))) if rng.random() < 0.7 else None
                  for _ in range(len(traj))]
        images = [f"shots/take {c}/IMG_{rng.integers(0, 99999):05d}.JPG" if with_images and rng.random() < 0.6 else None
                  for _ in range(len(traj))]
        trajectories.append(type(traj)(**{**traj.__dict__, "fy": traj.fx if model in SINGLE_FOCAL else traj.fy,
                                          "distortion": lenses, "images": images}))
    tset = formats.TrajectorySet(tuple(trajectories), random_points(rng, trajectories))
    out = tmp_path_factory.mktemp(fmt) / ("model" if fmt.startswith("colmap") else "t.json")
    distorted_frames = any(t.has_distortion for t in trajectories)
    families = {d is not None and d.lens.fisheye for t in trajectories for d in t.distortion}
    if fmt in ("worldstereo", "pano_bank") and distorted_frames:
        with pytest.raises(KeyframeWorldsError, match=f"cannot be written as {fmt}"):
            formats.write_trajectory_set(tset, out, fmt)
        return
    if fmt == "nerfstudio" and (len(families) > 1 or (model == "FULL_OPENCV" and distorted_frames)):
        with pytest.raises(KeyframeWorldsError, match="nerfstudio"):
            formats.write_trajectory_set(tset, out, fmt)
        return
    formats.write_trajectory_set(tset, out, fmt)
    back = formats.read_trajectory_set(out)
    by_name = {t.name: t for t in back.trajectories}
    for a in trajectories:
        b = by_name[a.name]
        if fmt in ("worldstereo", "pano_bank"):
            # These hold the projection, not the model's name, of a lens that is a pinhole anyway.
            assert all(d is None for d in b.distortion)
            a = type(a)(**{**a.__dict__, "distortion": None})
        assert b.allclose(a, atol=1e-9), fmt
    assert back.points == (tset.points if fmt in formats.POINT_FORMATS else None)
