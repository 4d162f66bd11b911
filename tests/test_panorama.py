"""Panoramas (issue 16 item 4): an equirectangular reference lifted to a 360-degree memory, upstream's pano_bank as a
trajectory format and as the first memory, cube-face depth aligned across faces, and no silent squash of a 2:1 image."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from keyframe_worlds.bridge import formats, panorama as pano
from keyframe_worlds.bridge import spec as bridge_spec
from keyframe_worlds.bridge.errors import KeyframeWorldsError


# The reference camera looks along world +Y with world +Z up (Blender's world); OpenCV axes: x right, y down, z forward.
FORWARD_Y = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def heading_c2w(heading_rad: float) -> np.ndarray:
    """Camera-to-world (OpenCV) of a camera at the origin turned ``heading`` to the right of world +Y, level."""
    c, s = math.cos(heading_rad), math.sin(heading_rad)
    c2w = np.eye(4)
    c2w[:3, 0] = (c, -s, 0.0)  # right
    c2w[:3, 1] = (0.0, 0.0, -1.0)  # down
    c2w[:3, 2] = (s, c, 0.0)  # forward
    return c2w


def heading_panorama(width: int, height: int) -> np.ndarray:
    """A panorama whose every column encodes its own heading: R, G = 128 + 100 (cos, sin) of the longitude."""
    u = np.arange(width) + 0.5
    lon, _ = pano.equirect_uv_to_lonlat(u, np.zeros_like(u), width, height)
    column = np.stack([128 + 100 * np.cos(lon), 128 + 100 * np.sin(lon), np.full_like(lon, 60)], -1)
    return np.broadcast_to(np.round(column).astype(np.uint8)[None], (height, width, 3)).copy()


def decoded_heading(rgb: np.ndarray) -> float:
    r, g = float(rgb[0]) - 128, float(rgb[1]) - 128
    return math.atan2(g, r)


def angle_error(a: float, b: float) -> float:
    return abs((a - b + math.pi) % (2 * math.pi) - math.pi)


def write_job(folder, reference: dict, frames: list[dict], width: int = 64, height: int = 48, **extra) -> dict:
    doc = {"version": 1, "name": "pano", "generator": "preview", "reference": reference,
           "trajectories": [{"name": "Cam", "fps": 24, "width": width, "height": height, "frames": frames}], **extra}
    (folder / "job.json").write_text(json.dumps(doc))
    return doc


def camera_frames(headings, f: float, width: int = 64, height: int = 48) -> list[dict]:
    return [{"frame": i + 1, "c2w_opencv": heading_c2w(h).tolist(), "fx": f, "fy": f, "cx": width / 2, "cy": height / 2}
            for i, h in enumerate(headings)]


# --- the convention ------------------------------------------------------------------------------


def test_the_convention_heading_zero_is_forward_right_is_positive_and_up_is_the_top_row():
    w, h = 400, 200
    rays = pano.equirect_rays_opencv(w, h)
    np.testing.assert_allclose(np.linalg.norm(rays, axis=-1), 1.0, atol=1e-12)
    centre = pano.lonlat_to_ray_opencv(*pano.equirect_uv_to_lonlat(np.array(w / 2), np.array(h / 2), w, h))
    np.testing.assert_allclose(centre, (0, 0, 1), atol=1e-12)  # forward
    right = pano.lonlat_to_ray_opencv(*pano.equirect_uv_to_lonlat(np.array(3 * w / 4), np.array(h / 2), w, h))
    np.testing.assert_allclose(right, (1, 0, 0), atol=1e-12)
    top = pano.lonlat_to_ray_opencv(*pano.equirect_uv_to_lonlat(np.array(w / 2), np.array(0.0), w, h))
    np.testing.assert_allclose(top, (0, -1, 0), atol=1e-12)  # up is the camera's -y
    lon, lat = pano.ray_opencv_to_lonlat(rays)
    u, v = pano.lonlat_to_equirect_uv(lon, lat, w, h)
    np.testing.assert_allclose(u, np.broadcast_to(np.arange(w) + 0.5, (h, w)), atol=1e-9)
    np.testing.assert_allclose(v, np.broadcast_to((np.arange(h) + 0.5)[:, None], (h, w)), atol=1e-9)


def test_a_lifted_panorama_puts_each_pixel_along_its_ray_at_its_distance():
    from keyframe_worlds.engine.world.memory import PointMemory
    from keyframe_worlds.engine.world.panorama import lift_panorama

    w, h = 64, 32
    rng = np.random.default_rng(0)
    distance = rng.uniform(1.0, 9.0, (h, w)).astype(np.float32)
    distance[:2] = 0  # no surface: not lifted
    c2w = heading_c2w(0.3)
    c2w[:3, 3] = (1.0, -2.0, 0.5)
    memory = PointMemory(max_points=None)
    rgb = torch.from_numpy(heading_panorama(w, h))
    count = lift_panorama(memory, rgb, torch.from_numpy(distance), torch.from_numpy(c2w))
    assert count == (h - 2) * w == len(memory)
    offsets = memory.positions_world.numpy().astype(np.float64) - c2w[:3, 3]
    np.testing.assert_allclose(np.linalg.norm(offsets, axis=1), distance[2:].ravel(), rtol=1e-5)
    expected = (pano.equirect_rays_opencv(w, h)[2:].reshape(-1, 3) @ c2w[:3, :3].T)
    np.testing.assert_allclose(offsets / np.linalg.norm(offsets, axis=1, keepdims=True), expected, atol=1e-5)


# --- the check: a camera turning 360 degrees inside a panorama ------------------------------------------


def test_a_camera_turning_360_degrees_sees_the_matching_part_of_the_panorama_at_every_heading(tmp_path):
    from keyframe_worlds.engine.run.runner import run_job

    w, h = 512, 256
    Image.fromarray(heading_panorama(w, h)).save(tmp_path / "pano.png")
    f = 48.0
    headings = [2 * math.pi * i / 24 for i in range(24)]
    write_job(tmp_path, {"image": "pano.png", "projection": "equirectangular"}, camera_frames(headings, f))
    job = bridge_spec.load_job(tmp_path / "job.json")
    assert job.reference.projection == "equirectangular"
    manifest = run_job(job, tmp_path / "bundle")
    assert any("sphere" in warning for warning in manifest.warnings)  # no depth, no model: said so
    worst = 0.0
    for heading, frame in zip(headings, manifest.trajectories[0].frames):
        out = np.asarray(Image.open(tmp_path / "bundle" / frame.image).convert("RGB"))
        for x in (8, 31, 32, 55):  # the centre columns and two off-centre ones
            expected = heading + math.atan((x + 0.5 - 32) / f)
            for y in (12, 24, 36):
                worst = max(worst, angle_error(decoded_heading(out[y, x]), expected))
    # One panorama column is 0.7 degrees; colour quantisation adds about as much.
    assert math.degrees(worst) < 2.5, math.degrees(worst)


def test_a_panorama_depth_map_places_the_memory_at_its_distances(tmp_path):
    from keyframe_worlds.engine.run.runner import run_job

    w, h = 256, 128
    Image.fromarray(heading_panorama(w, h)).save(tmp_path / "pano.png")
    lon, _ = pano.equirect_uv_to_lonlat(np.arange(w) + 0.5, np.zeros(w), w, h)
    distance = np.broadcast_to((3.0 + 1.5 * np.cos(lon))[None], (h, w)).astype(np.float32)
    distance = np.ascontiguousarray(distance)
    distance[: h // 8] = 0  # the sky: the far backdrop
    np.save(tmp_path / "pano_depth.npy", distance)
    write_job(tmp_path, {"image": "pano.png", "depth": "pano_depth.npy", "projection": "equirectangular"},
              camera_frames([0.0, math.pi], 48.0))
    manifest = run_job(bridge_spec.load_job(tmp_path / "job.json"), tmp_path / "bundle")
    assert not manifest.warnings
    for heading, frame in zip((0.0, math.pi), manifest.trajectories[0].frames):
        depth = np.load(tmp_path / "bundle" / frame.depth_npy)
        # The centre pixel's ray is the camera axis, so its z-depth is the panorama's distance at that heading.
        assert depth[30, 32] == pytest.approx(3.0 + 1.5 * math.cos(heading), rel=0.03)


# --- refusing to squash ---------------------------------------------------------------------------------------


def test_a_2_to_1_image_as_a_perspective_reference_is_refused_naming_projection(tmp_path):
    Image.fromarray(heading_panorama(512, 256)).save(tmp_path / "pano.png")
    doc = write_job(tmp_path, {"image": "pano.png"}, camera_frames([0.0], 48.0))
    problems = bridge_spec.validate_job(doc, base_dir=tmp_path)
    assert [p.path for p in problems] == ["reference.projection"]
    assert "equirectangular" in problems[0].reason and "512x256" in problems[0].reason
    # The engine refuses it too when it reads the pixels (a spec built without looking at the files).
    from keyframe_worlds.engine.run.runner import load_reference

    job = bridge_spec.JobSpec.from_json(doc, check_files=False).resolve(tmp_path)
    with pytest.raises(KeyframeWorldsError, match="reference.projection"):
        load_reference(job)
    # On the command line: one line naming the field, a non-zero exit.
    done = subprocess.run([sys.executable, "-m", "keyframe_worlds.cli", "validate", str(tmp_path / "job.json")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "reference.projection" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_an_equirectangular_reference_must_be_2_to_1_and_projection_must_be_known(tmp_path):
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "ref.png")
    doc = write_job(tmp_path, {"image": "ref.png", "projection": "equirectangular"}, camera_frames([0.0], 48.0))
    problems = bridge_spec.validate_job(doc, base_dir=tmp_path)
    assert [p.path for p in problems] == ["reference.projection"] and "2:1" in problems[0].reason
    doc = write_job(tmp_path, {"image": "ref.png", "projection": "fisheye"}, camera_frames([0.0], 48.0))
    problems = bridge_spec.validate_job(doc, base_dir=tmp_path)
    assert [p.path for p in problems] == ["reference.projection"] and "equirectangular" in problems[0].reason
    # A 2:1 image for a 2:1 perspective camera is its own shape: nothing is squashed, nothing refused.
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "wide.png")
    doc = write_job(tmp_path, {"image": "wide.png"}, camera_frames([0.0], 48.0, 64, 32), width=64, height=32)
    assert bridge_spec.validate_job(doc, base_dir=tmp_path) == []
    assert bridge_spec.JobSpec.from_json(doc).reference.to_json() == {"image": "wide.png"}  # perspective is the default


# --- upstream's pano_bank --------------------------------------------------------------------------------------

# Upstream's example bank: 832x480 views with K = [[240.1777, 0, 416], [0, 240, 240], [0, 0, 1]] and world-to-camera
# extrinsics such as these (view 0000 looks along world -X with world +Z up).
UPSTREAM_W2C = [
    [[0.0, 1.0, 0.0, -0.0], [0.0, 0.0, -1.0, -0.0], [-1.0, 0.0, 0.0, -0.0], [0.0, 0.0, 0.0, 1.0]],
    [[0.0, 1.0, 0.0, -0.0], [-0.4472135901451111, 0.0, -0.8944271802902222, -0.0],
     [-0.8944271802902222, 0.0, 0.4472135901451111, -0.0], [0.0, 0.0, 0.0, 1.0]],
    [[0.6427876353263855, 0.7660444378852844, 0.0, -0.0], [0.0, 0.0, -1.0, -0.0],
     [-0.7660444378852844, 0.6427876353263855, 0.0, -0.0], [0.0, 0.0, 0.0, 1.0]],
]


def write_upstream_bank(scene, w2cs, k, width, height, colours=None) -> None:
    bank = scene / "pano_bank"
    (bank / "images").mkdir(parents=True)
    doc = {}
    for i, w2c in enumerate(w2cs):
        key = f"{i:04d}"
        doc[key] = {"intrinsic": np.asarray(k).tolist(), "extrinsic": np.asarray(w2c).tolist()}
        colour = colours[i] if colours is not None else (i * 40 % 256, 100, 200)
        Image.fromarray(np.full((height, width, 3), colour, np.uint8)).save(bank / "images" / f"{key}.png")
    # Upstream writes the whole dict in one line, as json.dump does.
    (bank / "cameras.json").write_text(json.dumps(doc))


def test_an_upstream_pano_bank_reads_as_one_camera_with_its_views(tmp_path):
    k = [[240.17770385742188, 0.0, 416.0], [0.0, 240.0, 240.0], [0.0, 0.0, 1.0]]
    write_upstream_bank(tmp_path, UPSTREAM_W2C, k, 832, 480)
    for where in (tmp_path, tmp_path / "pano_bank", tmp_path / "pano_bank" / "cameras.json"):
        assert formats.detect_format(where) == "pano_bank"
    (traj,) = formats.read_trajectories(tmp_path / "pano_bank")
    assert traj.name == "pano_bank" and (traj.width, traj.height) == (832, 480)
    assert traj.frames.tolist() == [0, 1, 2]
    assert traj.images == ("images/0000.png", "images/0001.png", "images/0002.png")
    np.testing.assert_allclose(traj.fx, 240.17770385742188)
    np.testing.assert_allclose(traj.cy, 240.0)
    # World-to-camera in the file: view 0000 looks along world -X, its down is world -Z.
    np.testing.assert_allclose(traj.c2w_opencv[0][:3, 2], (-1, 0, 0), atol=1e-12)
    np.testing.assert_allclose(traj.c2w_opencv[0][:3, 1], (0, 0, -1), atol=1e-12)
    np.testing.assert_allclose(np.linalg.inv(traj.c2w_opencv), np.array(UPSTREAM_W2C), atol=1e-12)


def test_a_pano_bank_round_trips_through_every_format_and_the_command_line(tmp_path):
    k = [[50.0, 0.0, 32.0], [0.0, 50.0, 20.0], [0.0, 0.0, 1.0]]
    write_upstream_bank(tmp_path / "scene", UPSTREAM_W2C, k, 64, 40)
    (original,) = formats.read_trajectories(tmp_path / "scene")
    formats.write_trajectories([original], tmp_path / "again", "pano_bank")
    (again,) = formats.read_trajectories(tmp_path / "again")
    assert again.allclose(original, atol=1e-12)
    for fmt, target in (("keyframe-worlds", "t.json"), ("colmap", "colmap"), ("nerfstudio", "transforms.json")):
        formats.write_trajectories([original], tmp_path / target, fmt)
        (other,) = formats.read_trajectories(tmp_path / target)
        formats.write_trajectories([other], tmp_path / f"bank_{fmt}", "pano_bank")
        (back,) = formats.read_trajectories(tmp_path / f"bank_{fmt}")
        np.testing.assert_allclose(back.c2w_opencv, original.c2w_opencv, atol=1e-9)
        np.testing.assert_allclose(back.fx, original.fx, atol=1e-9)
        assert back.frames.tolist() == original.frames.tolist()
    # Upstream's own reader looks up each image's key: the written keys are the images' names.
    written = json.loads((tmp_path / "again" / "cameras.json").read_text())
    assert {"0000", "0001", "0002"} <= set(written) and written["0001"]["extrinsic"] == UPSTREAM_W2C[1]
    done = subprocess.run([sys.executable, "-m", "keyframe_worlds.cli", "trajectory", "convert", str(tmp_path / "scene"),
                           "--to", "keyframe-worlds", "--out", str(tmp_path / "cli.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (cli,) = formats.read_trajectories(tmp_path / "cli.json")
    assert cli.allclose(original, atol=1e-12)
    done = subprocess.run([sys.executable, "-m", "keyframe_worlds.cli", "trajectory", "convert", str(tmp_path / "cli.json"),
                           "--to", "pano_bank", "--out", str(tmp_path / "cli_bank")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert formats.read_trajectories(tmp_path / "cli_bank")[0].allclose(original, atol=1e-12)


def test_a_pano_bank_keeps_frame_numbers_image_names_and_several_cameras(tmp_path):
    k = [[50.0, 0.0, 32.0], [0.0, 50.0, 20.0], [0.0, 0.0, 1.0]]
    write_upstream_bank(tmp_path / "scene", UPSTREAM_W2C, k, 64, 40)
    (traj,) = formats.read_trajectories(tmp_path / "scene")
    doc = traj.to_json()
    shots = formats.Trajectory.from_json({**doc, "name": "shots", "frames": [
        {**f, "frame": n, "image": image} for f, n, image in zip(doc["frames"], (-3, 7, 12), ("shots/a.jpg", None, "b.png"))]})
    formats.write_trajectories([traj, shots], tmp_path / "two", "pano_bank")
    assert formats.detect_format(tmp_path / "two") == "pano_bank"
    back = {t.name: t for t in formats.read_trajectories(tmp_path / "two")}
    assert back["shots"].allclose(shots, atol=1e-12) and back["pano_bank"].allclose(traj, atol=1e-12)
    # Keys stay upstream's (view numbers from 0000); our frame numbers and image names ride along in each entry.
    written = json.loads((tmp_path / "two" / "shots" / "cameras.json").read_text())
    assert [k for k in written if k.isdigit()] == ["0000", "0001", "0002"]
    assert [written[k]["frame"] for k in ("0000", "0001", "0002")] == [-3, 7, 12]
    lens = formats.Distortion("OPENCV", (0.1, 0.0, 0.0, 0.0))
    distorted = formats.Trajectory.from_json({**doc, "frames": [{**f, "distortion": {"model": lens.model, "params": list(lens.params)}} for f in doc["frames"]]})
    with pytest.raises(KeyframeWorldsError, match="cannot be written as pano_bank"):
        formats.write_trajectories([distorted], tmp_path / "lens", "pano_bank")


BANK_COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def write_bank_views_job(folder) -> None:
    """A bank of four solid-colour views looking four ways, and a job whose camera turns to each of them."""
    width, height, f = 64, 48, 24.0  # 106 degrees wide: neighbouring views overlap
    headings = [0.0, math.pi / 2, math.pi, 3 * math.pi / 2]
    k = [[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]]
    write_upstream_bank(folder, [np.linalg.inv(heading_c2w(hd)) for hd in headings], k, width, height, BANK_COLOURS)
    write_job(folder, {"image": "pano_bank/images/0000.png", "views": "pano_bank"}, camera_frames(headings, f, width, height))


def check_bank_view_colours(manifest, bundle) -> None:
    for colour, frame in zip(BANK_COLOURS, manifest.trajectories[0].frames):
        out = np.asarray(Image.open(bundle / frame.image).convert("RGB")).astype(float)
        centre = out[12:36, 16:48].reshape(-1, 3).mean(0)
        assert np.abs(centre - colour).max() < 6, (frame.frame, centre, colour)


def test_pano_bank_views_are_the_first_memory_each_with_its_camera(tmp_path):
    """Four views of a bank, each a solid colour, looking four ways: a camera turned to each sees that view's colour
    (with the reference alone, the three other directions would be holes the preview fills from the one view)."""
    from keyframe_worlds.engine.run.runner import run_job

    write_bank_views_job(tmp_path)
    job = bridge_spec.load_job(tmp_path / "job.json")
    manifest = run_job(job, tmp_path / "bundle")
    check_bank_view_colours(manifest, tmp_path / "bundle")
    # A missing views folder, a malformed bank and a missing view image are problems of that field.
    doc = json.loads((tmp_path / "job.json").read_text())
    doc["reference"]["views"] = "nowhere"
    assert [p.path for p in bridge_spec.validate_job(doc, base_dir=tmp_path)] == ["reference.views"]
    doc["reference"]["views"] = "pano_bank"
    (tmp_path / "pano_bank" / "images" / "0003.png").unlink()
    problems = bridge_spec.validate_job(doc, base_dir=tmp_path)
    assert [p.path for p in problems] == ["reference.views"] and "0003.png" in problems[0].reason
    (tmp_path / "pano_bank" / "cameras.json").write_text('{"0000": {"intrinsic": [[1, 0], [0, 1]], "extrinsic": []}}')
    problems = bridge_spec.validate_job(doc, base_dir=tmp_path)
    assert [p.path for p in problems] == ["reference.views"] and "0000.extrinsic" in problems[0].reason


def test_the_service_reads_reference_views_only_inside_the_allowed_folders(tmp_path):
    import requests

    from keyframe_worlds.bridge.spec import load_manifest
    from keyframe_worlds.engine.testing.service import Engine

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    for folder in (allowed, outside):
        folder.mkdir()
        write_bank_views_job(folder)

    def local(views) -> dict:
        doc = json.loads((allowed / "job.json").read_text())
        doc["reference"] = {"image": str(allowed / "pano_bank" / "images" / "0000.png"), "views": str(views)}
        return doc

    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu", "--allow-path", str(allowed))) as engine:
        client = engine.start()
        post = lambda doc: requests.post(f"{engine.url}/v1/jobs", json=doc, timeout=30,
                                         headers={"Authorization": f"Bearer {engine.token}"})
        refused = post(local(outside / "pano_bank"))
        assert refused.status_code == 403 and [p["path"] for p in refused.json()["problems"]] == ["reference.views"]
        # A bank inside the allowed folders whose image is a link to one outside is refused too.
        (allowed / "linked").mkdir()
        shutil.copytree(allowed / "pano_bank", allowed / "linked" / "pano_bank")
        (allowed / "linked" / "pano_bank" / "images" / "0002.png").unlink()
        (allowed / "linked" / "pano_bank" / "images" / "0002.png").symlink_to(outside / "pano_bank" / "images" / "0002.png")
        refused = post(local(allowed / "linked" / "pano_bank"))
        assert refused.status_code == 403 and [p["path"] for p in refused.json()["problems"]] == ["reference.views"]
        # Views cannot be uploaded: said in one line naming the field.
        doc = local(allowed / "pano_bank")
        image = (allowed / "pano_bank" / "images" / "0000.png").read_bytes()
        uploaded = requests.post(f"{engine.url}/v1/jobs", timeout=30, headers={"Authorization": f"Bearer {engine.token}"},
                                 files=[("spec", (None, json.dumps({**doc, "reference": {"image": "a.png", "views": "pano_bank"}}))),
                                        ("image", ("a.png", image))])
        assert uploaded.status_code == 400 and [p["path"] for p in uploaded.json()["problems"]] == ["reference.views"]
        accepted = post(local(allowed / "pano_bank"))
        assert accepted.status_code == 201, accepted.text
        job_id = accepted.json()["id"]
        # The views are the job's own copy: the bank may go once the job is accepted.
        spec = json.loads((tmp_path / "jobs" / job_id / "spec.json").read_text())
        assert spec["reference"]["views"] == "inputs/reference_views.json"
        assert sorted(p.name for p in (tmp_path / "jobs" / job_id / "inputs" / "reference_views").rglob("*.png")) == [
            f"{k:06d}.png" for k in range(4)]
        shutil.rmtree(allowed / "pano_bank")
        done = client.wait(job_id, timeout=120)
        assert done.state == "completed", client.log(done.id)
        bundle = client.download_bundle(done.id, tmp_path / "bundle")
        check_bank_view_colours(load_manifest(bundle), bundle)


# --- cube faces aligned to one another ---------------------------------------------------------------------------


def box_distance(rays: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Distance from the origin along unit rays (..., 3) to the inside of the box [low, high] (origin inside)."""
    with np.errstate(divide="ignore"):
        t = np.where(rays > 0, high / rays, np.where(rays < 0, low / rays, np.inf))
    return t.min(axis=-1)


def test_cube_faces_estimated_at_different_scales_are_aligned_back_to_one_depth():
    from keyframe_worlds.engine.world.panorama import CUBE_FACES, face_rotation_opencv, panorama_distance_from_faces

    low, high = np.array([-3.0, -1.5, -2.0]), np.array([4.0, 2.5, 5.0])  # a room, camera off its centre
    scales = dict(zip(CUBE_FACES, (1.0, 1.7, 0.6, 2.2, 0.8, 1.3)))
    calls = []

    def face_depth(image, k):
        face = list(CUBE_FACES)[len(calls)]
        calls.append(face)
        size = image.shape[0]
        u = (np.arange(size) + 0.5 - k[2]) / k[0]
        v = (np.arange(size) + 0.5 - k[3]) / k[1]
        rays_face = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((1, 1))), -1)
        unit = rays_face / np.linalg.norm(rays_face, axis=-1, keepdims=True)
        distance = box_distance(unit @ face_rotation_opencv(*CUBE_FACES[face]).T, low, high)
        z = distance * unit[..., 2]
        return (z * scales[face]).astype(np.float32), np.ones_like(z, dtype=np.float32)

    w, h = 256, 128
    truth = box_distance(pano.equirect_rays_opencv(w, h), low, high)
    distance, confidence, fits = panorama_distance_from_faces(np.zeros((h, w, 3), np.uint8), face_depth)
    assert calls == list(CUBE_FACES)
    assert (distance > 0).all() and (confidence > 0).all()
    ratio = distance / truth
    # The first face sets the scale; every other face is brought to it.
    assert np.percentile(np.abs(ratio - 1.0), 95) < 0.03, np.percentile(np.abs(ratio - 1.0), [50, 95])
    for fit in fits[1:]:
        assert fit.overlap > 0
        assert fit.scale * scales[fit.face] == pytest.approx(1.0, rel=0.05), fit


def test_a_depthless_panorama_with_a_depth_network_is_estimated_on_cube_faces(tmp_path):
    from keyframe_worlds.engine.run.geometry import build_depth_estimator, panorama_depth
    from keyframe_worlds.engine.testing.tiny_models import write_tiny_depth_model

    model = write_tiny_depth_model(tmp_path / "depth-anything-tiny")
    estimator = build_depth_estimator(bridge_spec.GeometryOptions(depth_model=str(model)), "cpu")
    rgb = torch.from_numpy(heading_panorama(128, 64))
    lifted = panorama_depth(rgb, None, estimator)
    assert lifted.warning is None and "cube faces" in lifted.source
    assert lifted.depth_z_m.shape == (64, 128) and bool((lifted.depth_z_m > 0).all())


# --- the add-on: a panoramic reference camera renders the panorama and its distances with Cycles -------------------


def _emissive_cube(bpy, name: str, location, colour) -> None:
    bpy.ops.mesh.primitive_cube_add(size=1.0, location=location)
    material = bpy.data.materials.new(name)
    bsdf = material.node_tree.nodes["Principled BSDF"]
    bsdf.inputs["Base Color"].default_value = (0, 0, 0, 1)
    bsdf.inputs["Emission Color"].default_value = (*colour, 1)
    bsdf.inputs["Emission Strength"].default_value = 1.0
    bpy.context.object.data.materials.append(material)


def _nearest_cube(rgb: np.ndarray, cubes: dict) -> str:
    """Which cube's colour a pixel is (by direction in RGB, so shading does not matter)."""
    pixel = np.asarray(rgb, dtype=float) / max(np.linalg.norm(rgb), 1e-9)
    return max(cubes, key=lambda name: float(pixel @ (np.array(cubes[name][1]) / np.linalg.norm(cubes[name][1]))))


def test_the_addon_renders_a_panoramic_reference_camera_as_the_engine_reads_panoramas(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.jobs import JobSettings, prepare_job
    from keyframe_worlds.addon.reference import render_reference
    from keyframe_worlds.engine.run.runner import run_job

    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = 48, 32
    scene.view_settings.view_transform = "Standard"
    scene.frame_start, scene.frame_end = 1, 1
    cubes = {"front": ((0, 4, 0), (1, 0, 0)), "right": ((3, 0, 0), (0, 1, 0)), "back": ((0, -3, 0), (0, 0, 1)),
             "left": ((-3, 0, 0), (1, 1, 0))}
    for name, (location, colour) in cubes.items():
        _emissive_cube(bpy, name, location, colour)
    bpy.ops.mesh.primitive_plane_add(size=40, location=(0, 0, -1.0))  # a floor 1 m below the camera
    pano_cam = bpy.data.objects.new("A_Pano", bpy.data.cameras.new("A_Pano"))
    pano_cam.data.type, pano_cam.data.panorama_type = "PANO", "EQUIRECTANGULAR"
    pano_cam.rotation_euler = (math.pi / 2, 0, 0)  # looks along world +Y, up is world +Z
    persp = bpy.data.objects.new("B_Right", bpy.data.cameras.new("B_Right"))
    persp.rotation_euler = (math.pi / 2, 0, -math.pi / 2)  # looks along world +X
    for cam in (pano_cam, persp):
        scene.collection.objects.link(cam)
    before = (scene.render.resolution_x, scene.render.resolution_y, pano_cam.data.longitude_min)

    ref = render_reference(scene, pano_cam, 1, tmp_path / "render", samples=4)
    assert (scene.render.resolution_x, scene.render.resolution_y, pano_cam.data.longitude_min) == before
    assert ref.projection == "equirectangular" and (ref.width, ref.height) == (192, 96)
    rgb = np.asarray(Image.open(ref.image).convert("RGB")).astype(int)
    distance = np.load(ref.depth)
    # Which column is which heading (bridge/panorama.py): each cube at its heading, its near face at its distance.
    for name, heading, near in (("front", 0.0, 3.5), ("right", 90.0, 2.5), ("back", 180.0, 2.5), ("left", -90.0, 2.5)):
        u = int(pano.heading_column(math.radians(heading), 192)) % 192
        assert _nearest_cube(rgb[48, u], cubes) == name, (name, rgb[48, u])
        assert distance[48, u] == pytest.approx(near, rel=0.01), name
    # The floor: the distance along each ray, not a z-depth (which no panorama has).
    rays = pano.equirect_rays_opencv(192, 96)
    rays_world = rays @ np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]).T  # the camera's OpenCV axes in the world
    rows = np.arange(80, 96)
    floor = 1.0 / -rays_world[rows, 20, 2]  # distance along the ray to z = -1
    np.testing.assert_allclose(distance[rows, 20], floor, rtol=0.01)

    job = prepare_job(scene, JobSettings(name="pano", cameras="ALL", samples=4), tmp_path / "job")
    assert job.spec.reference.projection == "equirectangular" and job.spec.reference.trajectory == "A_Pano"
    manifest = run_job(job.spec, tmp_path / "job" / "bundle")
    assert not manifest.warnings
    right = next(t for t in manifest.trajectories if t.trajectory.name == "B_Right")
    out = np.asarray(Image.open(tmp_path / "job" / "bundle" / right.frames[0].image).convert("RGB")).astype(int)
    # The perspective camera looking along +X sees the green cube from the panorama's memory.
    assert _nearest_cube(out[16, 24], cubes) == "right", out[16, 24]
    front = next(t for t in manifest.trajectories if t.trajectory.name == "A_Pano")
    out = np.asarray(Image.open(tmp_path / "job" / "bundle" / front.frames[0].image).convert("RGB")).astype(int)
    assert _nearest_cube(out[16, 24], cubes) == "front", out[16, 24]


def test_a_picked_panorama_file_is_used_as_one_when_said_and_refused_when_not(blank_blend, tmp_path):
    bpy = blank_blend
    from keyframe_worlds.addon.jobs import JobSettings, prepare_job
    from keyframe_worlds.bridge.errors import ValidationError

    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = 64, 48
    scene.frame_start, scene.frame_end = 1, 2
    cam = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
    scene.collection.objects.link(cam)
    scene.camera = cam
    Image.fromarray(heading_panorama(256, 128)).save(tmp_path / "pano.png")
    settings = JobSettings(name="pano", reference="FILE", reference_path=str(tmp_path / "pano.png"), depth="NONE")
    with pytest.raises(ValidationError) as refused:
        prepare_job(scene, settings, tmp_path / "plain")
    assert [p.path for p in refused.value.problems] == ["reference.projection"]
    job = prepare_job(scene, JobSettings(**{**settings.__dict__, "projection": "equirectangular"}), tmp_path / "pano")
    assert job.spec.reference.projection == "equirectangular"
    assert json.loads(job.spec_path.read_text())["reference"]["projection"] == "equirectangular"
