"""Every command that writes, given an output that is a file where a folder is wanted (or the reverse), a
folder it may not write (a read-only tmpfs, so it holds for root too) or a missing parent: one clear line
naming the path, a non-zero exit, no traceback. The real console command, as a subprocess."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import VENV_BIN
from keyframe_worlds.engine.testing.service import dolly, write_preview_job

CLI = str(VENV_BIN / "keyframe-worlds")


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """(a file, a read-only folder, a path whose parent is missing)."""
    base = tmp_path_factory.mktemp("outputs")
    a_file = base / "a_file"
    a_file.write_text("x")
    read_only = base / "read_only"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(read_only)],
                             capture_output=True, timeout=10).returncode == 0
    if not mounted:
        os.chmod(read_only, 0o555)
        if os.access(read_only, os.W_OK):
            pytest.skip("cannot make a folder this user may not write (root without mount)")
    yield a_file, read_only, base / "missing" / "deeper"
    if mounted:
        subprocess.run(["umount", "-l", str(read_only)], capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    job = write_preview_job(base / "job", frames=3)
    traj = base / "cam.json"
    traj.write_text(__import__("json").dumps(dolly("Cam", frames=3).to_json()))
    return job, traj


def one_line_error(args, must_name: str):
    out = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "KEYFRAME_WORLDS_TOKEN": "t" * 32})
    assert out.returncode != 0, (args, out.stdout)
    assert "Traceback" not in out.stderr, (args, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyframe-worlds: error: ") and must_name in lines[0], (args, out.stderr)
    return lines[0]


def test_run_out(places, inputs):
    a_file, read_only, missing = places
    job, _ = inputs
    assert "is a file, not a folder" in one_line_error(["run", job, "--out", a_file, "--device", "cpu"], str(a_file))
    assert "not writable" in one_line_error(["run", job, "--out", read_only / "out", "--device", "cpu"], str(read_only))
    assert "does not exist" in one_line_error(["run", job, "--out", missing, "--device", "cpu"], str(missing.parent))


def test_trajectory_convert_out(places, inputs):
    a_file, read_only, missing = places
    _, traj = inputs
    one_line_error(["trajectory", "convert", traj, "--to", "colmap", "--out", a_file], str(a_file))
    one_line_error(["trajectory", "convert", traj, "--to", "keyframe-worlds", "--out", read_only / "t.json"], str(read_only))
    one_line_error(["trajectory", "convert", traj, "--to", "keyframe-worlds", "--out", missing / "t.json"], str(missing))
    one_line_error(["trajectory", "convert", traj, "--to", "keyframe-worlds", "--out", a_file.parent], str(a_file.parent))


def test_serve_job_root(places):
    a_file, read_only, _ = places
    assert "is a file" in one_line_error(["serve", "--job-root", a_file], str(a_file))
    one_line_error(["serve", "--job-root", read_only / "jobs"], str(read_only))


def test_model_check_out(places, tmp_path):
    a_file, read_only, missing = places
    common = ["--checkpoint", tmp_path, "--inputs", tmp_path / "in.safetensors"]
    assert "is a folder" in one_line_error(["model", "check", *common, "--out", a_file.parent], str(a_file.parent))
    one_line_error(["model", "check", *common, "--out", read_only / "o.safetensors"], str(read_only))
    one_line_error(["model", "check-pipeline", tmp_path, "--wan-dir", tmp_path, "--out", missing / "o.safetensors"], str(missing))
    one_line_error(["model", "check-pipeline", tmp_path, "--wan-dir", tmp_path, "--out", a_file.parent], str(a_file.parent))


def test_scene_outputs(places, tmp_path):
    pytest.importorskip("bpy")
    a_file, read_only, missing = places
    blend = tmp_path / "scene.blend"
    made = subprocess.run([str(VENV_BIN / "python"), "-c", "import bpy, sys; bpy.ops.wm.save_as_mainfile(filepath=sys.argv[1])",
                           str(blend)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0 and blend.is_file(), made.stderr
    scene = ["scene", "--blend", blend]

    def scene_error(args, must_name):
        out = subprocess.run([CLI, *map(str, scene + args)], capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        errors = [line for line in out.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and must_name in errors[0], out.stderr

    scene_error(["trajectory", "--format", "keyframe-worlds", "--out", missing / "t.json"], str(missing))
    scene_error(["trajectory", "--format", "keyframe-worlds", "--out", read_only / "t.json"], str(read_only))
    scene_error(["generate", "--out", a_file], str(a_file))
    scene_error(["import", tmp_path, "--save", read_only / "x.blend"], str(read_only))
