"""Learned geometry in the job runner: a depth model from the job's geometry section, the reference lifted with it,
every generated frame's depth aligned to the memory, and a flat reference never silent."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from keyframe_worlds.bridge.jobs import Progress
from keyframe_worlds.bridge.spec import load_job, load_manifest
from keyframe_worlds.engine.io.images import write_png
from keyframe_worlds.engine.run.runner import run_job
from keyframe_worlds.engine.testing.synthetic import demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast
from keyframe_worlds.engine.testing.tiny_models import write_tiny_depth_model
from keyframe_worlds.engine.world.depth_alignment import AlignedLearnedDepth
from keyframe_worlds.engine.world.learned_depth import RELATIVE_DISPARITY, DepthPrediction

W, H = 64, 48


def write_job(folder, depth=True, geometry=None, n=8, generator="preview", options=None):
    folder.mkdir(parents=True, exist_ok=True)
    k = intrinsics_for_fov(W, H, 70.0)
    frames = [{"frame": 1 + i, "c2w_opencv": look_at_c2w_opencv((-0.4 + 0.1 * i, -4.0, 1.6), (0.0, 2.0, 0.8)).tolist(),
               "fx": float(k[0]), "fy": float(k[1]), "cx": float(k[2]), "cy": float(k[3])} for i in range(n)]
    rgb, z = raycast(demo_scene(), torch.tensor(frames[0]["c2w_opencv"], dtype=torch.float64), k, W, H)
    write_png(folder / "ref.png", rgb.numpy())
    reference = {"image": "ref.png"}
    if depth:
        np.save(folder / "ref_depth.npy", z.numpy())
        reference["depth"] = "ref_depth.npy"
    doc = {"version": 1, "name": "geo", "generator": generator, "seed": 1, "reference": reference,
           "trajectories": [{"name": "Walk", "fps": 24.0, "width": W, "height": H, "frames": frames}],
           "output": {"mesh_every": 4, "point_budget": 50000}, "options": options or {"segment_length": 4}}
    if geometry is not None:
        doc["geometry"] = geometry
    (folder / "job.json").write_text(json.dumps(doc))
    return folder / "job.json", z.numpy()


class Warnings(Progress):
    def __init__(self):
        super().__init__()
        self.warnings, self.lines = [], []

    def warn(self, message):
        self.warnings.append(message)

    def log(self, message):
        self.lines.append(message)


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    return write_tiny_depth_model(tmp_path_factory.mktemp("depth") / "depth-anything-tiny")


def spread(z: np.ndarray) -> float:
    """(p90 - p10) / median of the positive depths: 0 for a flat board, scale-free."""
    z = z[z > 0]
    p10, p50, p90 = np.percentile(z, [10, 50, 90])
    return float((p90 - p10) / p50)


def test_a_reference_without_depth_and_without_a_model_is_a_flat_board_said_plainly(tmp_path):
    spec, _ = write_job(tmp_path, depth=False)
    progress = Warnings()
    manifest = run_job(load_job(spec), tmp_path / "out", progress=progress)
    assert len(progress.warnings) == 1 and "flat board" in progress.warnings[0]
    assert manifest.warnings == tuple(progress.warnings) == load_manifest(tmp_path / "out").warnings
    with_depth, _ = write_job(tmp_path / "d")
    assert run_job(load_job(with_depth), tmp_path / "d" / "out").warnings == ()


class TrueDisparity:
    """A stand-in depth network that sees the truth up to an unknown scale (plus noise) for the reference, and up to
    a scale and a shift along the frames (the memory's disparity where it renders). Nothing can recover a relative
    network's shift with no known depth at all, so the reference's has none; the runner's stated choice (median at
    5 m) then fixes the scale."""

    def __init__(self, reference_depth: np.ndarray):
        self.reference = torch.from_numpy(reference_depth)

    def predict(self, rgb, rendered=None, *, intrinsics=None):
        if rendered is None:
            z, shift = self.reference[None].clone(), 0.0
        else:
            z, shift = torch.where(rendered.mask, rendered.depth_z_m, torch.full_like(rendered.depth_z_m, 30.0)).cpu(), 0.2
        gen = torch.Generator().manual_seed(0)
        disparity = torch.where(z > 0, 3.0 / z.clamp_min(0.1), 0.0) + shift + 0.002 * torch.randn(z.shape, generator=gen)
        return DepthPrediction(values=disparity.float().to(rgb.device), kind=RELATIVE_DISPARITY)


def test_a_depthless_reference_lifted_by_an_estimate_has_the_scenes_shape(tmp_path):
    spec, true_depth = write_job(tmp_path, depth=False)
    job = load_job(spec)
    progress = Warnings()
    manifest = run_job(job, tmp_path / "out", progress=progress, depth_estimator=AlignedLearnedDepth(TrueDisparity(true_depth)))
    assert progress.warnings == [] and manifest.warnings == ()
    assert any("reference depth: the depth network" in line for line in progress.lines)
    first = np.load(tmp_path / "out" / manifest.trajectories[0].frames[0].depth_npy)
    flat = run_job(job, tmp_path / "flat").trajectories[0].frames[0]
    flat_depth = np.load(tmp_path / "flat" / flat.depth_npy)
    assert spread(flat_depth) < 0.05  # the board
    surface = true_depth > 0  # the sky has no depth to compare
    assert spread(first[surface]) == pytest.approx(spread(true_depth[surface]), rel=0.1)
    assert np.median(np.abs(first[surface] / np.median(first[surface]) - true_depth[surface] / np.median(true_depth[surface]))) < 0.05


def test_a_job_with_a_depth_model_runs_end_to_end(tmp_path, depth_model):
    spec, _ = write_job(tmp_path, geometry={"depth_model": str(depth_model)})
    progress = Warnings()
    manifest = run_job(load_job(spec), tmp_path / "out", progress=progress)
    assert sum(len(t.frames) for t in manifest.trajectories) == 8
    assert any(line.startswith("depth Walk frames 1-4: aligned by") for line in progress.lines), progress.lines
    assert any("depth-anything-tiny" in line for line in progress.lines)


def test_the_worldstereo_generator_gets_the_learned_depth_too(tmp_path, depth_model):
    from keyframe_worlds.engine.testing.tiny_models import write_tiny_variant, write_tiny_wan_folder

    wan = write_tiny_wan_folder(tmp_path / "wan")
    dmd = write_tiny_variant(tmp_path / "worldstereo-memory-dmd", "worldstereo-memory-dmd", seed=21)
    options = {"checkpoint": str(dmd), "wan_dir": str(wan), "size": [H, W], "keyframes": 3, "keyframe_stride": 2}
    spec, _ = write_job(tmp_path / "ws", geometry={"depth_model": str(depth_model)}, n=5, generator="worldstereo",
                        options=options)
    progress = Warnings()
    manifest = run_job(load_job(spec), tmp_path / "ws" / "out", progress=progress)
    assert len(manifest.trajectories[0].frames) == 5
    assert any(line.startswith("depth Walk frames 1-5: aligned by") for line in progress.lines), progress.lines


def test_run_takes_a_depth_model_on_the_command_line(tmp_path, depth_model):
    spec, _ = write_job(tmp_path)
    command = [sys.executable, "-m", "keyframe_worlds.cli", "run", str(spec), "--quiet"]
    done = subprocess.run([*command, "--out", str(tmp_path / "o"), "--depth-model", str(depth_model)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    missing = subprocess.run([*command, "--out", str(tmp_path / "o2"), "--depth-model", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "--depth-model: folder not found" in missing.stderr and "Traceback" not in missing.stderr
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((depth_model / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    refused = subprocess.run([*command, "--out", str(tmp_path / "o3"), "--depth-model", str(pickled)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "pickle" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


def test_a_reference_of_another_aspect_than_its_camera_is_stretched_and_said_so(tmp_path):
    from PIL import Image

    spec, _ = write_job(tmp_path, depth=False, n=2)
    Image.open(tmp_path / "ref.png").resize((W * 5 // 4, H)).save(tmp_path / "ref.png")  # 1.25x as wide as the camera's aspect
    progress = Warnings()
    manifest = run_job(load_job(spec), tmp_path / "out", progress=progress)
    stretched = [w for w in progress.warnings if "stretched 1.250x" in w]
    assert len(stretched) == 1 and "camera 'Walk'" in stretched[0], progress.warnings
    assert stretched[0] in manifest.warnings
    same, _ = write_job(tmp_path / "same", n=2)  # the camera's own aspect: nothing said
    assert run_job(load_job(same), tmp_path / "same" / "out").warnings == ()
