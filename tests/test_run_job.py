"""``keyframe-worlds run`` and ``run_job`` end to end: the real command, real files read back."""

import json
import subprocess
import threading

import numpy as np
import pytest
import torch

from keyframe_worlds.bridge import ply
from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.bridge.formats import read_trajectories
from keyframe_worlds.bridge.spec import MANIFEST_FILENAME, load_job, load_manifest
from keyframe_worlds.engine.io.exr import read_depth_exr
from keyframe_worlds.engine.io.images import read_rgb, write_png
from keyframe_worlds.engine.io.video import read_mp4
from keyframe_worlds.bridge.jobs import JobCancelled, Progress
from keyframe_worlds.engine.run.runner import run_job
from keyframe_worlds.engine.testing.synthetic import demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast

from conftest import VENV_BIN

W, H = 64, 48


def frames_json(eyes, target, k, first=1):
    return [
        {"frame": first + i, "c2w_opencv": look_at_c2w_opencv(e, target).tolist(),
         "fx": float(k[0]), "fy": float(k[1]), "cx": float(k[2]), "cy": float(k[3])}
        for i, e in enumerate(eyes)
    ]


def write_job(folder, n=10, depth=True, options=None):
    k = intrinsics_for_fov(W, H, 70.0)
    walk = frames_json([(-0.4 + 0.08 * i, -4.0, 1.6) for i in range(n)], (0.0, 2.0, 0.8), k)
    turn = frames_json([(0.0, -3.5, 1.5)] * 5, (-3.0, 1.0, 0.8), k, first=101)
    rgb, z = raycast(demo_scene(), torch.tensor(walk[0]["c2w_opencv"], dtype=torch.float64), k, W, H)
    write_png(folder / "ref.png", rgb.numpy())
    np.save(folder / "ref_depth.npy", z.numpy())
    job = {
        "version": 1, "name": "shot010", "generator": "preview",
        "reference": {"image": "ref.png", **({"depth": "ref_depth.npy"} if depth else {})},
        "trajectories": [
            {"name": "Cam/01 é", "fps": 12.0, "width": W, "height": H, "frames": walk},
            {"name": "Turn", "fps": 24.0, "width": W, "height": H, "frames": turn},
        ],
        "output": {"mesh_every": 4, "mesh_stride": 4, "point_budget": 20000},
        "options": options or {"segment_length": 4},
    }
    path = folder / "job.json"
    path.write_text(json.dumps(job))
    return path


def test_cli_run_writes_a_complete_valid_bundle(tmp_path):
    job = write_job(tmp_path)
    out = tmp_path / "bundle"
    proc = subprocess.run([str(VENV_BIN / "keyframe-worlds"), "run", str(job), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "generate" in proc.stderr and "15/15" in proc.stderr  # the progress bar
    assert "geometric preview" in proc.stdout

    spec = load_job(job)
    manifest = load_manifest(out)  # validates every path and that every file exists
    assert manifest.generator == "preview" and "geometric preview" in manifest.generator_label
    assert [rt.trajectory.name for rt in manifest.trajectories] == ["Cam/01 é", "Turn"]
    for rt, original in zip(manifest.trajectories, spec.trajectories):
        # Every exported camera equals its input: in the manifest and in the camera file.
        assert rt.trajectory == original
        camera_file = out / "cameras" / (rt.video.split("/")[1][:-4] + ".json")
        assert read_trajectories(camera_file) == [original]
        video, meta = read_mp4(out / rt.video)
        assert meta["codec"] == "h264" and meta["fps"] == pytest.approx(original.fps)
        assert video.shape == (len(original), H, W, 3)
        for i, f in enumerate(rt.frames):
            assert f.frame == original.frames[i]
            rgb = read_rgb(out / f.image)
            assert rgb.shape == (H, W, 3)
            assert np.abs(video[i].astype(int) - rgb.astype(int)).mean() < 6
            depth = np.load(out / f.depth_npy)
            assert depth.dtype == np.float32 and depth.shape == (H, W) and np.all(depth > 0)
            np.testing.assert_array_equal(read_depth_exr(out / f.depth_exr), depth)
    from PIL import Image

    with Image.open(out / manifest.trajectories[0].frames[0].image) as im:
        assert "geometric preview" in im.text["Comment"]

    # Meshes at every 4th frame of each camera, textured with that frame, facing their camera.
    assert [(m.trajectory, m.frame) for m in manifest.meshes] == [
        ("Cam/01 é", 1), ("Cam/01 é", 5), ("Cam/01 é", 9), ("Turn", 101), ("Turn", 105)]
    walk = spec.trajectories[0]
    mesh = ply.read_ply(out / manifest.meshes[1].path)
    assert {"x", "y", "z", "s", "t"} <= set(mesh.vertex) and len(mesh.faces) > 50
    assert (out / manifest.meshes[1].texture).is_file()
    v = mesh.positions()[mesh.faces]
    normals = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    to_camera = walk.c2w_opencv[4, :3, 3] - v.mean(axis=1)
    assert np.mean(np.einsum("ij,ij->i", normals, to_camera) > 0) > 0.99
    assert mesh.vertex["s"].min() >= 0 and mesh.vertex["s"].max() <= 1 and mesh.vertex["t"].min() >= 0

    cloud = ply.read_ply(out / manifest.point_cloud)
    assert cloud.count == manifest.point_count and 1000 < cloud.count <= 20000
    assert cloud.colors_u8() is not None
    assert set(np.unique(cloud.vertex["frame"])) >= {0}
    assert not list(out.rglob(".*tmp*"))


def test_cancelling_stops_between_frames_and_leaves_no_manifest(tmp_path):
    spec = load_job(write_job(tmp_path))
    event = threading.Event()

    class CancelAfterThree(Progress):
        def report(self, event_):
            if event_.stage == "generate" and event_.done >= 3:
                event.set()

    with pytest.raises(JobCancelled, match="cancelled"):
        run_job(spec, tmp_path / "out", CancelAfterThree(cancel_event=event))
    assert not (tmp_path / "out" / MANIFEST_FILENAME).exists()
    assert not list((tmp_path / "out").rglob("*.mp4")) and not list((tmp_path / "out").rglob(".*tmp*"))


def test_a_rerun_into_the_same_folder_replaces_the_bundle(tmp_path):
    spec = load_job(write_job(tmp_path, depth=False))
    first = run_job(spec, tmp_path / "out")
    second = run_job(spec, tmp_path / "out")
    assert first.point_count == second.point_count  # deterministic
    assert load_manifest(tmp_path / "out").point_count == second.point_count


def test_user_errors_are_reported_cleanly(tmp_path):
    job = write_job(tmp_path, options={"steps": 3})
    proc = subprocess.run([str(VENV_BIN / "keyframe-worlds"), "run", str(job), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "options.steps: unknown option of the preview generator" in proc.stderr and "Traceback" not in proc.stderr

    job = write_job(tmp_path)
    np.save(tmp_path / "ref_depth.npy", np.zeros((3, 4, 5), np.float32))
    with pytest.raises(KeyframeWorldsError, match="2-D array"):
        run_job(load_job(job), tmp_path / "o")
    np.save(tmp_path / "ref_depth.npy", np.full((H, W), np.nan, np.float32))
    with pytest.raises(KeyframeWorldsError, match="no positive, finite depth"):
        run_job(load_job(job), tmp_path / "o")
    proc = subprocess.run([str(VENV_BIN / "keyframe-worlds"), "run", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_generators_that_use_references_get_the_retrieved_earlier_frames(tmp_path):
    from keyframe_worlds.engine.generators import Generator, SegmentResult
    from keyframe_worlds.engine.generators.preview import PreviewGenerator

    class Recording(Generator):
        """The preview's frames, recording what retrieval handed over."""

        name, label, segment_length, uses_references = "preview", "test: preview frames, references recorded", 4, True
        retrieval_every = 4  # the generator's cadence, whatever output.mesh_every says

        def __init__(self):
            self.inner = PreviewGenerator(segment_length=4)
            self.seen = []

        def generate(self, request, on_frame=None, on_step=None):
            self.seen.append(([r.key for r in request.references], request.pairs.tolist()))
            # Frames only: the job's depth estimator supplies the depth.
            return SegmentResult(rgb=self.inner.generate(request, on_frame, on_step).rgb)

    from keyframe_worlds.engine.world.depth import MemoryDepthCompletion

    class CountingDepth(MemoryDepthCompletion):
        calls = 0

        def estimate(self, rgb, rendered, **kwargs):
            CountingDepth.calls += 1
            return super().estimate(rgb, rendered)

    spec = load_job(write_job(tmp_path, n=10))
    recording = Recording()
    manifest = run_job(spec, tmp_path / "out", generator=recording, depth_estimator=CountingDepth())
    assert CountingDepth.calls == 5
    assert manifest.generator_label.startswith("test:")
    assert len(recording.seen) == 3 + 2  # segments: 10 frames / 4 and 5 frames / 4
    first_keys, first_pairs = recording.seen[0]
    assert first_keys == [("Cam/01 é", 1)]  # only the reference exists yet
    assert first_pairs == [0, 0, 0, 0]
    later_keys, _ = recording.seen[2]
    # Keyframes written so far (frames 1 and 5 of the walk) are candidates too; at most 8 are picked.
    assert ("Cam/01 é", 5) in later_keys and len(later_keys) <= 8
    # The turned camera looks at the left of the room: whatever it gets must overlap what it sees.
    turn_keys, turn_pairs = recording.seen[3]
    assert len(turn_keys) >= 1 and all(p >= 0 for p in turn_pairs)


def test_terminal_progress_bar_moves_with_denoising_steps():
    import io

    from keyframe_worlds.bridge.jobs import TerminalProgress

    out = io.StringIO()
    bar = TerminalProgress(stream=out, width=20)
    bar.frames(10, 40, "Walk frame 10")
    assert "[#####...............] 10/40" in out.getvalue()
    bar.frames(10, 40, "Walk frames 11-20", in_flight=10 * 2 / 4, step=2, steps=4)  # half of the next 10 frames' denoising
    line = out.getvalue().rsplit("\r", 1)[1]
    assert "[########............] 10/40 Walk frames 11-20 step 2/4" in line  # 15 of 40 frames' worth
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(JobCancelled, match=r"generate \(10/40, denoising step 3/4\)"):
        TerminalProgress(stream=io.StringIO(), cancel_event=cancel).frames(10, 40, in_flight=7.5, step=3, steps=4)


def test_mesh_every_is_an_output_setting_only(tmp_path):
    """output.mesh_every places meshes in the bundle; the frames, depth and point cloud stay the same."""
    from keyframe_worlds.engine.testing.service import tree_digest

    digests = {}
    for every in (1, 5):
        folder = tmp_path / f"every{every}"
        folder.mkdir()
        path = write_job(folder)
        doc = json.loads(path.read_text())
        doc["output"]["mesh_every"] = every
        path.write_text(json.dumps(doc))
        manifest = run_job(load_job(path), folder / "out")
        assert [m.frame for m in manifest.meshes if m.trajectory == manifest.trajectories[0].trajectory.name] == [
            int(f) for f in manifest.trajectories[0].trajectory.frames[::every]]
        digests[every] = {k: v for k, v in tree_digest(folder / "out").items()
                          if not k.startswith("meshes/") and k != "manifest.json"}
    assert digests[1] == digests[5]
