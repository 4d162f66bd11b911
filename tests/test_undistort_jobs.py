"""Jobs with distorted cameras: the reference undistorted with OpenCV to a pinhole keeping its field of view.

OpenCV's own ``undistortPoints`` is the reference for where a distorted pixel goes; the synthetic scene
(``engine/testing/synthetic.py``), ray-cast at the chosen pinhole, is the reference for the undistorted image.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from test_bridge_distortion import LENSES as FORMAT_LENSES

from keyframe_worlds.bridge import cameras as conv
from keyframe_worlds.bridge.cameras import Distortion, Intrinsics
from keyframe_worlds.bridge.jobs import Progress
from keyframe_worlds.bridge.spec import load_job, load_manifest, validate_job
from keyframe_worlds.engine.io.images import read_rgb, write_png
from keyframe_worlds.engine.io.video import read_mp4
from keyframe_worlds.engine.run.lens import pinhole_job
from keyframe_worlds.engine.run.runner import load_reference, run_job
from keyframe_worlds.engine.testing.synthetic import demo_scene, look_at_c2w_opencv, raycast
from keyframe_worlds.engine.world.undistort import distort_maps, pinhole_keeping_fov, undistort_maps

# One realistic lens per distorted model (every parameter non-zero, so a dropped or swapped one shows): the
# format tests' table, without the pinholes.
LENSES = {model: params for model, params in FORMAT_LENSES.items() if params}
SINGLE_FOCAL = {"SIMPLE_RADIAL", "RADIAL", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE"}
W, H = 160, 120
CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 200, 1e-14)


def lens_camera(model: str) -> Intrinsics:
    fy = 130.0 if model in SINGLE_FOCAL else 124.0
    return Intrinsics(130.0, fy, 81.25, 58.5, W, H)


def opencv_undistort(points_ours: np.ndarray, intr: Intrinsics, distortion: Distortion, pinhole: Intrinsics) -> np.ndarray:
    """OpenCV's own undistortion of our continuous pixels, back in our convention (pixel centres on integers there)."""
    k = np.array([[intr.fx, 0, intr.cx - 0.5], [0, intr.fy, intr.cy - 0.5], [0, 0, 1]])
    p = np.array([[pinhole.fx, 0, pinhole.cx - 0.5], [0, pinhole.fy, pinhole.cy - 0.5], [0, 0, 1]])
    pts = (points_ours - 0.5).reshape(-1, 1, 2).astype(np.float64)
    d = np.array(distortion.opencv_coefficients())
    if distortion.lens.fisheye:
        out = cv2.fisheye.undistortPoints(pts, k, d.reshape(4, 1), R=np.eye(3), P=p, criteria=CRITERIA)
    else:
        out = cv2.undistortPointsIter(pts, k, d, np.eye(3), p, CRITERIA)
    return out.reshape(-1, 2) + 0.5


@pytest.mark.parametrize("model", sorted(LENSES))
def test_the_maps_send_each_pinhole_pixel_where_opencv_undistorts_its_source(model):
    intr, distortion = lens_camera(model), Distortion(model, LENSES[model])
    pinhole = pinhole_keeping_fov(intr, distortion)
    maps = undistort_maps(intr, distortion, pinhole)
    rows, cols = np.mgrid[2:H:7, 3:W:9]
    keep = maps.valid[rows, cols]
    pinhole_px = np.stack([cols[keep] + 0.5, rows[keep] + 0.5], -1)  # our pixel centres
    source_px = np.stack([maps.source_x[rows, cols][keep], maps.source_y[rows, cols][keep]], -1).astype(np.float64) + 0.5
    assert len(pinhole_px) > 100
    # A distorted grid point goes where OpenCV's undistortPoints puts it, to 1e-3 px.
    np.testing.assert_allclose(opencv_undistort(source_px, intr, distortion, pinhole), pinhole_px, atol=1e-3)
    # And where the project's own (COLMAP) lens formulas put it: the same lens on both sides.
    xy = np.stack([(pinhole_px[:, 0] - pinhole.cx) / pinhole.fx, (pinhole_px[:, 1] - pinhole.cy) / pinhole.fy], -1)
    ours = conv.distort_normalized(xy, distortion) * [intr.fx, intr.fy] + [intr.cx, intr.cy]
    np.testing.assert_allclose(source_px, ours, atol=2e-3)  # the maps are float32


@pytest.mark.parametrize("model", sorted(LENSES))
def test_the_way_back_sends_each_plate_pixel_where_opencv_undistorts_it(model):
    intr, distortion = lens_camera(model), Distortion(model, LENSES[model])
    pinhole = pinhole_keeping_fov(intr, distortion)
    back = distort_maps(pinhole, distortion, intr)
    # The pinhole keeps the field of view: every plate pixel's ray is inside it.
    assert back.valid.all()
    rows, cols = np.mgrid[1:H:5, 2:W:7]
    plate_px = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], -1)
    pinhole_px = np.stack([back.source_x[rows, cols].ravel(), back.source_y[rows, cols].ravel()], -1).astype(np.float64) + 0.5
    np.testing.assert_allclose(pinhole_px, opencv_undistort(plate_px, intr, distortion, pinhole), atol=1e-3)
    # Undistorting then distorting back gives the plate again (a smooth image: only the two resamplings differ).
    yy, xx = np.mgrid[0:H, 0:W]
    plate = np.stack([127 + 120 * np.sin(xx / 9.0), 127 + 120 * np.cos(yy / 7.0), 127 + 100 * np.sin((xx + yy) / 11.0)], -1)
    plate = plate.round().astype(np.uint8)
    again = back.remap(undistort_maps(intr, distortion, pinhole).remap(plate))
    inner = np.zeros((H, W), bool)
    inner[3:-3, 3:-3] = True
    assert mean_abs(again, plate, inner) < 1.5
    # Without the way back (the pinhole frame taken as it is) the plate is far off.
    assert mean_abs(undistort_maps(intr, distortion, pinhole).remap(plate), plate, inner) > 5 * mean_abs(again, plate, inner)


def test_a_fisheye_wider_than_a_pinhole_leaves_its_widest_plate_pixels_empty():
    intr = Intrinsics(40.0, 40.0, 80.0, 60.0, W, H)  # about 150 degrees across: more than a pinhole holds
    distortion = Distortion("OPENCV_FISHEYE", LENSES["OPENCV_FISHEYE"])
    back = distort_maps(pinhole_keeping_fov(intr, distortion), distortion, intr)
    assert back.valid[H // 2, W // 2] and not back.valid[0, 0]
    out = back.remap(np.full((H, W, 3), 200, np.uint8))
    assert np.all(out[~back.valid] == 0) and np.all(out[back.valid & (np.arange(W)[None] > 60) & (np.arange(W)[None] < 100)] == 200)


@pytest.mark.parametrize("model", sorted(LENSES))
def test_the_pinhole_keeps_the_field_of_view(model):
    intr, distortion = lens_camera(model), Distortion(model, LENSES[model])
    pinhole = pinhole_keeping_fov(intr, distortion)
    edge = np.linspace(0.0, 1.0, 41)
    border = np.concatenate([np.stack([edge * W, np.zeros_like(edge)], -1), np.stack([edge * W, np.full_like(edge, H)], -1),
                             np.stack([np.zeros_like(edge), edge * H], -1), np.stack([np.full_like(edge, W), edge * H], -1)])
    seen = opencv_undistort(border, intr, distortion, pinhole)
    # Every edge pixel of the plate lands inside the pinhole frame (so nothing is cropped), and the frame is not
    # much larger than it needs to be (it touches the plate's outline).
    assert np.all(seen[:, 0] >= -0.6) and np.all(seen[:, 0] <= W + 0.6) and np.all(seen[:, 1] >= -0.6) and np.all(seen[:, 1] <= H + 0.6)
    assert seen[:, 0].min() < 2 or seen[:, 1].min() < 2


# --- a job with a distorted reference -----------------------------------------------------------------------------


SUPERSAMPLE = 4


def distorted_plate(scene, c2w, intr: Intrinsics, distortion: Distortion) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 and (H, W) z-depth of the scene as the distorted camera sees it.

    Each plate pixel's ideal pinhole pixel is OpenCV's undistortion of it; a pinhole ray-cast at 4x the resolution,
    on a canvas covering all of them, is sampled there (colour bilinear, depth nearest).
    """
    rows, cols = np.mgrid[0:H, 0:W]
    plate_px = np.stack([cols + 0.5, rows + 0.5], -1).reshape(-1, 2).astype(np.float64)
    ideal = opencv_undistort(plate_px, intr, distortion, intr)
    lo = np.floor(ideal.min(0)) - 2
    hi = np.ceil(ideal.max(0)) + 2
    size = ((hi - lo) * SUPERSAMPLE).astype(int)
    k = torch.tensor([intr.fx * SUPERSAMPLE, intr.fy * SUPERSAMPLE, (intr.cx - lo[0]) * SUPERSAMPLE,
                      (intr.cy - lo[1]) * SUPERSAMPLE], dtype=torch.float64)
    big_rgb, big_z = raycast(scene, c2w, k, int(size[0]), int(size[1]))
    at = ((ideal - lo) * SUPERSAMPLE - 0.5).astype(np.float32).reshape(H, W, 2)
    rgb = cv2.remap(big_rgb.numpy(), at[..., 0], at[..., 1], cv2.INTER_LINEAR)
    depth = cv2.remap(big_z.numpy().astype(np.float32), at[..., 0], at[..., 1], cv2.INTER_NEAREST)
    return rgb, depth


CAMERA_EYE, CAMERA_TARGET = (-0.4, -4.0, 1.6), (0.0, 2.0, 0.8)
PLATE_LENS = Distortion("OPENCV", (-0.24, 0.071, 0.0012, -0.0017))


def write_distorted_job(folder, distortion: Distortion | None = PLATE_LENS) -> tuple:
    """A three-frame job whose reference is the scene seen through ``distortion`` (None: the pinhole itself)."""
    intr = lens_camera("OPENCV")
    c2w = look_at_c2w_opencv(CAMERA_EYE, CAMERA_TARGET)
    if distortion is None:
        rgb, z = (x.numpy() for x in raycast(demo_scene(), c2w, torch.tensor([intr.fx, intr.fy, intr.cx, intr.cy]), W, H))
    else:
        rgb, z = distorted_plate(demo_scene(), c2w, intr, distortion)
    write_png(folder / "plate.png", rgb)
    np.save(folder / "plate_depth.npy", z)
    lens = {} if distortion is None else {"distortion": {"model": distortion.model, "params": list(distortion.params)}}
    frames = [{"frame": 1 + i, "c2w_opencv": look_at_c2w_opencv((CAMERA_EYE[0] + 0.05 * i, *CAMERA_EYE[1:]), CAMERA_TARGET).tolist(),
               "fx": intr.fx, "fy": intr.fy, "cx": intr.cx, "cy": intr.cy,
               **lens, "image": f"images/{1 + i:04d}.jpg"}
              for i in range(3)]
    job = {"version": 1, "name": "plate", "generator": "preview",
           "reference": {"image": "plate.png", "depth": "plate_depth.npy"},
           "trajectories": [{"name": "Plate", "fps": 24.0, "width": W, "height": H, "frames": frames}],
           "output": {"mesh_every": 8, "mesh_stride": 8, "point_budget": 50000},
           "geometry": {"flow": "none", "point_maps": False},
           "options": {"segment_length": 4}}
    (folder / "job.json").write_text(json.dumps(job))
    return folder / "job.json", intr, c2w, rgb


def mean_abs(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64))[where].mean())


@pytest.fixture(scope="module")
def plate_job(tmp_path_factory):
    return write_distorted_job(tmp_path_factory.mktemp("plate"))


def test_the_undistorted_reference_matches_the_pinhole_view_of_the_scene(plate_job):
    path, intr, c2w, plate = plate_job
    assert validate_job(json.loads(path.read_text()), base_dir=path.parent) == []  # distortion is no longer refused
    lens = pinhole_job(load_job(path))
    _traj, _index, rgb, depth = load_reference(lens.spec)
    undistorted, undistorted_depth, valid = lens.undistort_reference(rgb, depth)
    pinhole = lens.spec.trajectories[0].intrinsics(0)
    assert pinhole.fx < intr.fx  # barrel distortion: the pinhole keeping the field of view is wider
    truth_rgb, truth_z = raycast(demo_scene(), c2w, torch.tensor([pinhole.fx, pinhole.fy, pinhole.cx, pinhole.cy],
                                                                 dtype=torch.float64), W, H)
    truth_rgb, truth_z = truth_rgb.numpy(), truth_z.numpy()
    assert 0.7 < valid.mean() < 1.0  # the plate's outline leaves corners of the pinhole frame empty
    inner = valid.copy()
    inner[:2], inner[-2:], inner[:, :2], inner[:, -2:] = False, False, False, False
    # Straight lines are straight again: the undistorted plate is the pinhole view, up to resampling at texture edges;
    # the plate as it was (distorted) is far from it.
    assert mean_abs(undistorted, truth_rgb, inner) < 6.0
    assert mean_abs(plate, truth_rgb, inner) > 3 * mean_abs(undistorted, truth_rgb, inner)
    # Depth, remapped to the nearest source pixel, is the pinhole's z-depth (a pinhole ray is the lens's same ray).
    surface = inner & (truth_z > 0) & (undistorted_depth > 0)
    relative = np.abs(undistorted_depth - truth_z)[surface] / truth_z[surface]
    assert np.median(relative) < 0.01
    assert np.all(undistorted[~valid] == 0) and np.all(undistorted_depth[~valid] == 0)


class Log(Progress):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture(scope="module")
def plate_bundle(plate_job):
    """The distorted job run once: (its bundle folder, the manifest run_job returned, the log lines)."""
    path = plate_job[0]
    log = Log()
    manifest = run_job(load_job(path), path.parent / "out", log)
    return path.parent / "out", manifest, log


def test_a_distorted_job_runs_on_pinhole_cameras_and_keeps_the_plate_lens(plate_job, plate_bundle, tmp_path):
    path, intr, c2w, _plate = plate_job
    out, manifest, log = plate_bundle
    lens_lines = [line for line in log.lines if line.startswith("lens:")]
    assert len(lens_lines) == 1  # one lens, every frame: one pinhole, said once
    assert "camera 'Plate' OPENCV k1=-0.24" in lens_lines[0] and "keeping its field of view" in lens_lines[0]
    assert f"focal {intr.fx:.2f} x {intr.fy:.2f} px -> " in lens_lines[0]
    back = load_manifest(out)
    rt = back.trajectories[0]
    # The frames were made for the pinhole; the plate's lens is kept beside it, frame for frame.
    assert rt.trajectory.distortion == (None, None, None) and not rt.trajectory.has_distortion
    assert len(set(rt.trajectory.fx)) == 1 and float(rt.trajectory.fx[0]) < intr.fx
    assert rt.source is not None and rt.source.distortion == (PLATE_LENS,) * 3
    assert np.array_equal(rt.source.fx, [intr.fx] * 3) and np.array_equal(rt.source.c2w_opencv, rt.trajectory.c2w_opencv)
    assert rt.source.images == ("images/0001.jpg", "images/0002.jpg", "images/0003.jpg") == rt.trajectory.images
    assert manifest.trajectories[0].source == rt.source
    # The bundle's first frame is the reference camera: the memory shows the scene as the pinhole sees it, as
    # closely as a job whose reference was that pinhole view in the first place (the splats' own error), and far
    # closer than the plate as it was.
    k = rt.trajectory.intrinsics(0)
    truth, _z = (x.numpy() for x in raycast(demo_scene(), c2w, torch.tensor([k.fx, k.fy, k.cx, k.cy], dtype=torch.float64), W, H))
    first = read_rgb(out / rt.frames[0].image)
    pinhole_folder = tmp_path / "pinhole"
    pinhole_folder.mkdir()
    pinhole_path, *_ = write_distorted_job(pinhole_folder, None)
    doc = json.loads(pinhole_path.read_text())
    for frame in doc["trajectories"][0]["frames"]:
        frame.update(fx=k.fx, fy=k.fy, cx=k.cx, cy=k.cy)
    write_png(pinhole_folder / "plate.png", truth)
    np.save(pinhole_folder / "plate_depth.npy", _z)
    pinhole_path.write_text(json.dumps(doc))
    baseline = read_rgb(pinhole_folder / "out" / run_job(load_job(pinhole_path), pinhole_folder / "out").trajectories[0].frames[0].image)
    centre = np.zeros((H, W), bool)
    centre[H // 6 : -H // 6, W // 6 : -W // 6] = True
    assert mean_abs(first, truth, centre) < 1.3 * mean_abs(baseline, truth, centre) + 1.0
    assert mean_abs(first, truth, centre) < 0.5 * mean_abs(_plate, truth, centre)


def test_the_frames_in_the_plate_lens_lie_on_the_plate(plate_job, plate_bundle):
    _path, intr, _c2w, plate = plate_job
    out, _manifest, _log = plate_bundle
    rt = load_manifest(out).trajectories[0]
    assert [f.source_image for f in rt.frames] == [f"source/Plate/{n:06d}.png" for n in (1, 2, 3)]
    assert rt.source_video == "source/Plate.mp4"
    # The reference camera's frame, in the plate's lens, is the plate as it was filmed: each of its pixels shows what
    # the plate's pixel shows (up to the memory's splats), where the pinhole frame taken as it is does not.
    first_pinhole = read_rgb(out / rt.frames[0].image)
    first_plate = read_rgb(out / rt.frames[0].source_image)
    assert first_plate.shape == plate.shape
    inner = np.zeros((H, W), bool)
    inner[4:-4, 4:-4] = True
    covered = inner & (plate.max(-1) > 0)  # the scene's sky is black
    assert (first_plate[covered].max(-1) > 0).mean() > 0.95
    assert mean_abs(first_plate, plate, covered) < 0.5 * mean_abs(first_pinhole, plate, covered)
    # Straight edges of the scene bend as the plate's do: the edge map of the frame lies on the plate's.
    edges = [cv2.Canny(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), 60, 140) > 0 for x in (plate, first_plate, first_pinhole)]
    near = cv2.dilate(edges[0].astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    on_plate = [float(near[e & inner].mean()) for e in edges[1:]]
    assert on_plate[0] > 0.6 and on_plate[0] > on_plate[1] + 0.2
    # A client downloading the bundle fetches all of them.
    from keyframe_worlds.bridge.client import manifest_paths

    on_disk = {p.relative_to(out).as_posix() for p in (out / "source").rglob("*") if p.is_file()}
    listed = manifest_paths(json.loads((out / "manifest.json").read_text()))
    assert len(on_disk) == 4 and on_disk == {p for p in listed if p.startswith("source/")}
    # The video is those frames.
    video, info = read_mp4(out / rt.source_video)
    assert video.shape == (3, H, W, 3)
    assert mean_abs(video[0], first_plate, inner) < 4.0


def test_old_manifests_without_source_lens_still_read_and_a_bad_one_is_named(plate_bundle):
    out = plate_bundle[0]
    doc = json.loads((out / "manifest.json").read_text())
    from keyframe_worlds.bridge.spec import ResultManifest, validate_manifest

    assert validate_manifest(doc, out) == []
    old = json.loads(json.dumps(doc))
    del old["trajectories"][0]["source_lens"]
    # Files in a lens the manifest does not give are named.
    assert [p.path for p in validate_manifest(old)] == ["trajectories[0].source_lens"]
    del old["trajectories"][0]["source_video"]
    for f in old["trajectories"][0]["files"]:
        del f["source_image"]
    assert ResultManifest.from_json(old).trajectories[0].source is None
    assert ResultManifest.from_json(old).trajectories[0].source_video is None
    doc["trajectories"][0]["source_lens"][1]["distortion"] = {"model": "OPENCV", "params": [1, 2]}
    assert [p.path for p in validate_manifest(doc)] == ["trajectories[0].source_lens[1].distortion.params"]
    doc["trajectories"][0]["source_lens"] = doc["trajectories"][0]["source_lens"][:2]
    assert [p.path for p in validate_manifest(doc)] == ["trajectories[0].source_lens"]


# --- Blender: the imported movie clip carries the plate's lens --------------------------------------------------


def libmv_distort(model: str, values: dict, xy: np.ndarray) -> np.ndarray:
    """Blender's (libmv's) distortion of ideal normalised coordinates, from libmv's distortion_models.h, written out
    here independently of the module under test: POLYNOMIAL radial k1..k3; BROWN radial k1..k4 and tangential
    ``p1 (r^2 + 2 x^2) + 2 p2 x y`` in x, ``p2 (r^2 + 2 y^2) + 2 p1 x y`` in y."""
    x, y = xy[:, 0], xy[:, 1]
    r2 = x * x + y * y
    if model == "POLYNOMIAL":
        radial = 1 + values["k1"] * r2 + values["k2"] * r2**2 + values["k3"] * r2**3
        return np.stack([x * radial, y * radial], -1)
    radial = 1 + values["brown_k1"] * r2 + values["brown_k2"] * r2**2 + values["brown_k3"] * r2**3 + values["brown_k4"] * r2**4
    p1, p2 = values["brown_p1"], values["brown_p2"]
    return np.stack([x * radial + p1 * (r2 + 2 * x * x) + 2 * p2 * x * y, y * radial + p2 * (r2 + 2 * y * y) + 2 * p1 * x * y], -1)


@pytest.mark.parametrize("model", ["SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV"])
def test_the_blender_lens_distorts_as_the_plate_lens(model):
    from keyframe_worlds.bridge.cameras import distortion_to_blender_tracking

    params = LENSES[model] if model != "FULL_OPENCV" else (-0.31, 0.11, 0.0011, -0.0009, -0.021, 0, 0, 0)
    lens = Distortion(model, params)
    blender_model, values = distortion_to_blender_tracking(lens)
    assert blender_model == ("BROWN" if model in ("OPENCV", "FULL_OPENCV") else "POLYNOMIAL")
    xy = np.random.default_rng(0).uniform(-0.6, 0.6, (200, 2))
    # Blender applies the lens with y up (images bottom row first): our (x, y) is its (x, -y).
    y_up = np.array([1.0, -1.0])
    np.testing.assert_allclose(libmv_distort(blender_model, values, xy * y_up) * y_up, conv.distort_normalized(xy, lens), atol=1e-12)


@pytest.mark.parametrize("model", ["OPENCV_FISHEYE", "SIMPLE_RADIAL_FISHEYE", "FULL_OPENCV"])
def test_lenses_blender_cannot_hold_are_named(model):
    from keyframe_worlds.bridge.cameras import distortion_to_blender_tracking
    from keyframe_worlds.bridge.errors import KeyframeWorldsError

    with pytest.raises(KeyframeWorldsError, match="fisheye|rational terms"):
        distortion_to_blender_tracking(Distortion(model, LENSES[model]))


def small_distorted_job(folder, lens: Distortion) -> Path:
    """A 2-frame 64x48 job of the given lens (the reference a gradient at 3 m): cheap, for the import."""
    w, h = 64, 48
    yy, xx = np.mgrid[0:h, 0:w]
    fx, fy = (52.0, 52.0) if lens.lens.single_focal else (52.0, 49.0)
    poses = [look_at_c2w_opencv((0.1 * i, -3.0, 1.0), (0.0, 0.0, 1.0)) for i in range(2)]
    return run_lens_job(folder, lens, np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8), (fx, fy, 31.0, 25.5), poses)


def run_lens_job(folder, lens: Distortion, reference_rgb: np.ndarray, fx_fy_cx_cy: tuple, poses: list) -> Path:
    """Run a preview job of camera "Plate" with ``lens`` at ``poses`` whose reference (frame 1) is ``reference_rgb``
    (H, W, 3) uint8 on a wall 3 m away; returns its bundle folder."""
    h, w = reference_rgb.shape[:2]
    write_png(folder / "ref.png", reference_rgb)
    np.save(folder / "ref_depth.npy", np.full((h, w), 3.0, np.float32))
    fx, fy, cx, cy = fx_fy_cx_cy
    frames = [{"frame": 1 + i, "c2w_opencv": c2w.tolist(), "fx": fx, "fy": fy, "cx": cx, "cy": cy,
               "distortion": {"model": lens.model, "params": list(lens.params)}} for i, c2w in enumerate(poses)]
    doc = {"version": 1, "name": "lens", "generator": "preview", "reference": {"image": "ref.png", "depth": "ref_depth.npy"},
           "trajectories": [{"name": "Plate", "fps": 24.0, "width": w, "height": h, "frames": frames}],
           "output": {"mesh_every": 8, "mesh_stride": 8}, "geometry": {"flow": "none", "point_maps": False}}
    (folder / "job.json").write_text(json.dumps(doc))
    run_job(load_job(folder / "job.json"), folder / "out")
    return folder / "out"


@pytest.mark.parametrize("model", ["OPENCV", "RADIAL", "OPENCV_FISHEYE"])
def test_importing_a_distorted_job_sets_the_clip_lens(blank_blend, tmp_path, model):
    bpy = blank_blend
    from keyframe_worlds.addon.importers import import_bundle

    lens = Distortion(model, LENSES[model])
    bundle = small_distorted_job(tmp_path, lens)
    result = import_bundle(bpy.context.scene, bundle)
    camera = result.cameras[0]
    (background,) = [bg for bg in camera.data.background_images if bg.source == "MOVIE_CLIP"]
    clip, tracking = background.clip, background.clip.tracking.camera
    rt = load_manifest(bundle).trajectories[0]
    source = rt.source
    # The clip is the video in the plate's lens, and the camera is the plate's (its focal length, its lens kept).
    assert Path(bpy.path.abspath(clip.filepath)).resolve() == (bundle / rt.source_video).resolve()
    assert background.clip_user.use_render_undistorted
    assert camera.data.lens * 64 / camera.data.sensor_width == pytest.approx(source.fx[0], rel=1e-5)
    assert camera.data["kfw_lens_model"] == model
    (sequence,) = [bg for bg in camera.data.background_images if bg.source == "IMAGE"]
    assert Path(bpy.path.abspath(sequence.image.filepath)).name == Path(rt.frames[0].source_image).name
    assert "/source/" in Path(bpy.path.abspath(sequence.image.filepath)).as_posix()
    if model == "OPENCV_FISHEYE":
        # Blender has no fisheye model: said, and the clip is left a pinhole.
        assert any("keeps no lens distortion" in w and "OPENCV_FISHEYE is a fisheye" in w for w in result.warnings)
        assert tracking.k1 == 0 and tracking.brown_k1 == 0
        return
    assert not [w for w in result.warnings if "lens" in w]
    assert tracking.units == "PIXELS"
    assert tracking.focal_length_pixels == pytest.approx(source.fx[0], rel=1e-5)
    assert tracking.pixel_aspect == pytest.approx(source.fy[0] / source.fx[0], rel=1e-5)
    assert tuple(tracking.principal_point_pixels) == pytest.approx((31.0, 48 - 25.5), abs=1e-3)  # y up from the bottom
    if model == "OPENCV":
        k1, k2, p1, p2 = LENSES["OPENCV"]
        assert tracking.distortion_model == "BROWN"
        assert (tracking.brown_k1, tracking.brown_k2, tracking.brown_p1, tracking.brown_p2) == pytest.approx((k1, k2, p2, -p1), rel=1e-6)
    else:
        assert tracking.distortion_model == "POLYNOMIAL"
        assert (tracking.k1, tracking.k2, tracking.k3) == pytest.approx((*LENSES["RADIAL"], 0.0), rel=1e-6)


def test_a_distorted_job_killed_and_resumed_writes_the_same_bundle_as_one_run(tmp_path):
    """kill -9 after the first camera finished and inside the second: the resumed bundle, frames in the plate's
    lens and their videos included, is the uninterrupted one file for file (the finished camera keeps its
    source_video through the checkpoint, and its trajectory stays the pinhole)."""
    import os
    import signal
    import subprocess
    import sys

    from keyframe_worlds.engine.testing import faults
    from keyframe_worlds.engine.testing.service import tree_digest

    path, *_ = write_distorted_job(tmp_path)
    doc = json.loads(path.read_text())
    camera = doc["trajectories"][0]
    frames = [{**camera["frames"][i % 3], "frame": 1 + i} for i in range(6)]
    for i, frame in enumerate(frames):
        frame.pop("image")
        frame["c2w_opencv"] = look_at_c2w_opencv((CAMERA_EYE[0] + 0.04 * i, *CAMERA_EYE[1:]), CAMERA_TARGET).tolist()
    doc["trajectories"] = [{**camera, "frames": frames}, {**camera, "name": "Second", "frames": frames}]
    doc["options"] = {"segment_length": 2}
    path.write_text(json.dumps(doc))
    command = [sys.executable, "-m", "keyframe_worlds.cli", "run", str(path), "--quiet"]
    env = {**os.environ, faults.KILL_AFTER_CHECKPOINTS_ENV: "4"}
    killed = subprocess.run([*command, "--out", str(tmp_path / "resumed")], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run([*command, "--out", str(tmp_path / "resumed"), "--resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([*command, "--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=120)
    assert whole.returncode == 0, whole.stderr
    a, b = tree_digest(tmp_path / "resumed"), tree_digest(tmp_path / "whole")
    assert "source/Plate.mp4" in a and "source/Second/000006.png" in a and a == b
    manifest = load_manifest(tmp_path / "resumed")
    assert [rt.source_video for rt in manifest.trajectories] == ["source/Plate.mp4", "source/Second.mp4"]
    assert all(not rt.trajectory.has_distortion and rt.source.has_distortion for rt in manifest.trajectories)


def test_a_bundle_without_frames_in_the_plate_lens_imports_its_pinhole_frames_and_says_so(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.importers import import_bundle

    bundle = small_distorted_job(tmp_path, Distortion("RADIAL", LENSES["RADIAL"]))
    doc = json.loads((bundle / "manifest.json").read_text())
    del doc["trajectories"][0]["source_video"]
    for f in doc["trajectories"][0]["files"]:
        del f["source_image"]
    (bundle / "manifest.json").write_text(json.dumps(doc))
    result = import_bundle(bpy.context.scene, bundle)
    assert any("frames of the pinhole only" in w and "do not line up with the plate" in w for w in result.warnings)
    (clip,) = [bg.clip for bg in result.cameras[0].data.background_images if bg.source == "MOVIE_CLIP"]
    assert Path(bpy.path.abspath(clip.filepath)).name == "Plate.mp4" and "/video/" in bpy.path.abspath(clip.filepath)
    assert clip.tracking.camera.k1 == 0  # a pinhole video is given no lens


def test_distorted_reference_views_are_fused_as_their_pinholes(tmp_path):
    """``reference.views`` from a COLMAP model whose camera has lens distortion (its images the distorted plates):
    each view is undistorted before it is fused, so the memory shows the scene where a pinhole sees it. The same
    images declared pinhole (the lens ignored, as before) put it visibly elsewhere."""
    from keyframe_worlds.bridge.formats import write_trajectories
    from keyframe_worlds.bridge.trajectory import Trajectory

    intr = lens_camera("OPENCV")
    # The views look at the left wall, which the reference (looking at the back wall) hardly sees.
    target = (-5.0, 0.0, 1.0)
    poses = [look_at_c2w_opencv((0.0, y, 1.5), target) for y in (-1.0, -0.5)]
    (tmp_path / "model").mkdir()
    for i, c2w in enumerate(poses):  # the images beside the model: a views folder's names are relative to it
        rgb, _z = distorted_plate(demo_scene(), c2w, intr, PLATE_LENS)
        write_png(tmp_path / "model" / f"{i}.png", rgb)

    def views(lens) -> Trajectory:
        return Trajectory("Scan", np.arange(1, 3), np.stack([np.asarray(p) for p in poses]),
                          *(np.full(2, v) for v in (intr.fx, intr.fy, intr.cx, intr.cy)), W, H, distortion=lens,
                          images=("0.png", "1.png"))

    path, *_ = write_distorted_job(tmp_path, None)  # a pinhole reference of the back wall
    doc = json.loads(path.read_text())
    pinhole = pinhole_keeping_fov(intr, PLATE_LENS)
    camera_c2w = look_at_c2w_opencv((0.0, -0.75, 1.5), (-5.0, 0.2, 1.0))
    camera = {"frame": 1, "c2w_opencv": camera_c2w.tolist(), "fx": pinhole.fx, "fy": pinhole.fy, "cx": pinhole.cx,
              "cy": pinhole.cy}
    reference = doc["trajectories"][0]
    doc["trajectories"] = [{**reference, "frames": reference["frames"][:1]}, {**reference, "name": "Look", "frames": [camera]}]
    doc["reference"]["views"] = "model"
    truth, _z = (x.numpy() for x in raycast(demo_scene(), camera_c2w,
                                            torch.tensor([pinhole.fx, pinhole.fy, pinhole.cx, pinhole.cy], dtype=torch.float64), W, H))
    errors = {}
    for label, lens in (("undistorted", PLATE_LENS), ("lens ignored", None)):
        write_trajectories([views(lens)], tmp_path / "model", "colmap")
        path.write_text(json.dumps(doc))
        log = Log()
        manifest = run_job(load_job(path), tmp_path / label, log)
        frame = read_rgb(tmp_path / label / manifest.trajectories[1].frames[0].image)
        inner = np.zeros((H, W), bool)
        inner[4:-4, 4:-4] = True  # the lens moves the frame's outer parts most
        errors[label] = mean_abs(frame, truth, inner)
        if lens is not None:
            assert any(line.startswith("reference views lens: camera 'Scan' OPENCV") for line in log.lines), log.lines
    assert errors["undistorted"] < 0.6 * errors["lens ignored"], errors
