"""Headless commands through the console script (`keyframe-worlds scene ... --blend`), on a real saved .blend."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, VENV_BIN

CLI = str(VENV_BIN / "keyframe-worlds")


def load_demo():
    spec = importlib.util.spec_from_file_location("kfw_demo", REPO_ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scene_blend(tmp_path_factory):
    """The demo's street scene, small: 12 frames at 64x36, saved to a .blend."""
    folder = tmp_path_factory.mktemp("scene")
    code = (
        "import sys, bpy\n"
        f"sys.path.insert(0, {str(REPO_ROOT / 'scripts')!r})\n"
        "import demo\n"
        "demo.build_scene(12, 64, 36)\n"
        f"bpy.ops.wm.save_as_mainfile(filepath={str(folder / 'scene.blend')!r})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return folder / "scene.blend"


def run(*args, timeout=300):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_trajectory_command_writes_the_animation(scene_blend, tmp_path):
    out = run("scene", "--blend", scene_blend, "trajectory", "--camera", "Dolly", "--frames", "3-9", "--step", "2",
              "--format", "keyframe-worlds", "--out", tmp_path / "t.json")
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "t.json").read_text())
    (traj,) = doc["trajectories"]
    assert traj["name"] == "Dolly" and [f["frame"] for f in traj["frames"]] == [3, 5, 7, 9]
    assert (traj["width"], traj["height"]) == (64, 36)
    xs = [f["c2w_opencv"][0][3] for f in traj["frames"]]
    assert all(b > a for a, b in zip(xs, xs[1:])), "the dolly moves along +X"


def test_blend_goes_before_or_after_the_command(scene_blend, tmp_path):
    """The README writes ``scene <command> --blend FILE ...``; ``scene --blend FILE <command>`` works too."""
    after = run("scene", "trajectory", "--blend", scene_blend, "--camera", "Dolly", "--frames", "3-5",
                "--format", "keyframe-worlds", "--out", tmp_path / "after.json")
    before = run("scene", "--blend", scene_blend, "trajectory", "--camera", "Dolly", "--frames", "3-5",
                 "--format", "keyframe-worlds", "--out", tmp_path / "before.json")
    assert after.returncode == 0 and before.returncode == 0, after.stderr + before.stderr
    assert (tmp_path / "after.json").read_text() == (tmp_path / "before.json").read_text()
    neither = run("scene", "trajectory", "--format", "colmap", "--out", tmp_path / "x")
    assert neither.returncode == 2 and "--blend FILE" in neither.stderr and "Traceback" not in neither.stderr


def test_frames_beyond_the_scene_are_refused(scene_blend, tmp_path):
    """The 12-frame scene: frames 10-20 would hold the last pose for 8 frames; that is said, not written."""
    out = run("scene", "trajectory", "--blend", scene_blend, "--camera", "Dolly", "--frames", "10-20",
              "--format", "keyframe-worlds", "--out", tmp_path / "t.json")
    assert out.returncode == 2 and "outside the scene's frame range 1-12 (frames 13-20)" in out.stderr, out.stderr
    assert not (tmp_path / "t.json").exists()


def test_marker_cameras_and_bad_camera(scene_blend, tmp_path):
    out = run("scene", "--blend", scene_blend, "trajectory", "--cameras", "MARKERS", "--format", "colmap", "--out", tmp_path / "c")
    assert out.returncode == 0, out.stderr
    assert "2 camera(s), 12 frame(s)" in out.stdout
    bad = run("scene", "--blend", scene_blend, "trajectory", "--camera", "Nope", "--format", "colmap", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "no camera named 'Nope'" in bad.stderr and "Dolly" in bad.stderr
    missing = run("scene", "--blend", tmp_path / "none.blend", "trajectory", "--format", "colmap", "--out", tmp_path / "x")
    assert missing.returncode == 2 and ".blend file not found" in missing.stderr


def test_generate_then_import(scene_blend, tmp_path):
    import shutil

    blend = tmp_path / "work.blend"
    shutil.copy(scene_blend, blend)
    job = tmp_path / "job"
    out = run("scene", "--blend", blend, "generate", "--camera", "Dolly", "--frames", "1-6", "--samples", "2",
              "--out", job, "--import")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (job / "job.json").is_file() and (job / "reference.png").is_file()
    assert np.load(job / "reference_depth.npy").max() > 0
    manifest = json.loads((job / "bundle" / "manifest.json").read_text())
    assert [len(t["files"]) for t in manifest["trajectories"]] == [6]
    # The saved file holds the job's collection with the imported point cloud.
    check = subprocess.run([sys.executable, "-c",
                            "import bpy, sys\n"
                            f"bpy.ops.wm.open_mainfile(filepath={str(blend)!r})\n"
                            "c = bpy.data.collections['KFW job']\n"
                            "print(sorted(o.type for o in c.objects))\n"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    types = eval(check.stdout.strip().splitlines()[-1])
    assert "POINTCLOUD" in types and "MESH" in types

    # `import` again into another file replaces nothing else and saves where asked.
    again = run("scene", "--blend", scene_blend, "import", job / "bundle", "--save", tmp_path / "imported.blend", "--no-meshes")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "imported.blend").is_file() and "0 mesh(es)" in again.stdout


def test_generate_reports_engine_errors(scene_blend, tmp_path):
    out = run("scene", "--blend", scene_blend, "generate", "--reference", tmp_path / "missing.png", "--out", tmp_path / "j")
    assert out.returncode == 2 and "reference image not found" in out.stderr


def test_blender_command_is_registered_with_the_addon():
    code = (
        "import bpy, keyframe_worlds\n"
        "keyframe_worlds.register()\n"
        "from keyframe_worlds.addon import headless\n"
        "print(len(headless._registered))\n"
        "print(headless.blender_cli(['trajectory', '--format', 'colmap', '--out', '/nonexistent/x', '--camera', 'Nope']))\n"
        "keyframe_worlds.unregister()\n"
        "print(len(headless._registered))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2", "0"]


def test_worldstereo_without_models_is_a_clear_error(scene_blend, tmp_path):
    out = run("scene", "--blend", scene_blend, "generate", "--generator", "worldstereo", "--frames", "1-4", "--samples", "1",
              "--model-dir", tmp_path, "--out", tmp_path / "j")
    assert out.returncode == 2
    assert "options.checkpoint" in out.stderr and "Traceback" not in out.stderr
