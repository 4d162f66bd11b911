"""The ``keyframe-worlds`` console command, run as a real subprocess; and the bridge's import isolation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, VENV_BIN, example_camera_files, make_trajectory

CLI = str(VENV_BIN / "keyframe-worlds")


def run(*args, cwd=None):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_bridge_imports_without_blender_or_torch():
    code = (
        "import sys\n"
        "import keyframe_worlds, keyframe_worlds.cli\n"
        "from keyframe_worlds.bridge import cameras, colmap, errors, formats, imageinfo, sparse, spec, trajectory, commands\n"
        "heavy = sorted(m for m in ('bpy', 'torch', 'mathutils', 'cv2') if m in sys.modules)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"


def test_bridge_uses_only_stdlib_numpy_requests():
    import ast

    allowed = set(sys.stdlib_module_names) | {"numpy", "requests", "__future__"}
    for path in (REPO_ROOT / "bridge").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("validate", "trajectory"):
        assert command in out.stdout


def _write_job(tmp_path, **changes):
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 100, 50)).save(tmp_path / "ref.png")
    doc = {"version": 1, "name": "cli", "generator": "preview", "reference": {"image": "ref.png"},
           "trajectories": [make_trajectory("Cam", 3).to_json()]}
    doc.update(changes)
    (tmp_path / "job.json").write_text(json.dumps(doc))
    return tmp_path / "job.json"


def test_validate_ok(tmp_path):
    out = run("validate", _write_job(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "valid job spec" in out.stdout
    folder = run("validate", tmp_path)  # a job folder validates the job it holds
    assert folder.returncode == 0 and "job.json: valid job spec" in folder.stdout, folder.stderr


def test_validate_prints_every_problem_and_fails(tmp_path):
    job = _write_job(tmp_path, generator="magic", version=3)
    doc = json.loads(job.read_text())
    doc["trajectories"][0]["frames"][1]["fx"] = -1
    job.write_text(json.dumps(doc))
    out = run("validate", job)
    assert out.returncode == 1
    for path in ("generator:", "version:", "trajectories[0].frames[1].fx:"):
        assert path in out.stderr
    as_json = run("validate", job, "--json")
    assert as_json.returncode == 1
    problems = json.loads(as_json.stdout)["problems"]
    assert {p["path"] for p in problems} >= {"generator", "version", "trajectories[0].frames[1].fx"}


def test_validate_checks_the_generators_options_and_the_geometry_without_torch(tmp_path):
    job = _write_job(tmp_path, generator="worldstereo", options={"checkpoint": "x", "offload": "bogus", "steps": -1},
                     geometry={"depth_model": "nowhere", "flow": "magic"})
    out = run("validate", job, "--json")
    assert out.returncode == 1
    paths = {p["path"] for p in json.loads(out.stdout)["problems"]}
    assert {"options.offload", "options.steps", "geometry.depth_model", "geometry.flow"} <= paths, paths
    # the check is cheap: validating imports neither torch nor the engine's networks
    probe = subprocess.run([sys.executable, "-c", "import sys, argparse; import keyframe_worlds.engine.run.commands as c; "
                            f"c.cmd_validate(argparse.Namespace(path={str(job)!r}, no_files=False, json=True)); "
                            "print('TORCH', 'torch' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert "TORCH False" in probe.stdout, probe.stdout + probe.stderr


def test_validate_bad_json_is_a_clear_error(tmp_path):
    (tmp_path / "job.json").write_text("{oops")
    out = run("validate", tmp_path / "job.json")
    assert out.returncode == 2
    assert "not valid JSON" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("fmt", ["keyframe-worlds", "worldstereo", "nerfstudio", "colmap", "colmap-binary"])
def test_trajectory_convert_chain(tmp_path, fmt):
    from keyframe_worlds.bridge.formats import read_trajectories

    source = example_camera_files()[0]
    target = tmp_path / ("sparse" if fmt.startswith("colmap") else "out.json")
    out = run("trajectory", "convert", source, "--to", fmt, "--out", target)
    assert out.returncode == 0, out.stderr
    assert "81 frame(s)" in out.stdout
    back = run("trajectory", "convert", target, "--to", "worldstereo", "--out", tmp_path / "back.json")
    assert back.returncode == 0, back.stderr
    a = json.loads(source.read_text())
    b = json.loads((tmp_path / "back.json").read_text())
    np.testing.assert_allclose(b["extrinsic"], a["extrinsic"], atol=1e-5)
    np.testing.assert_allclose(b["intrinsic"], a["intrinsic"], atol=1e-9)
    assert read_trajectories(tmp_path / "back.json")[0].width == 1080


def test_convert_distorted_colmap_binary_to_nerfstudio_and_back(tmp_path):
    """Lens parameters and image names survive COLMAP binary -> nerfstudio -> COLMAP binary; points need a COLMAP target."""
    from test_bridge_distortion import LENSES, colmap_fixture, write_colmap_binary

    from keyframe_worlds.bridge import formats

    write_colmap_binary(tmp_path / "sparse", colmap_fixture("OPENCV"))
    source = formats.read_trajectory_set(tmp_path / "sparse")
    out = run("trajectory", "convert", tmp_path / "sparse", "--to", "nerfstudio", "--out", tmp_path / "transforms.json")
    assert out.returncode == 0, out.stderr
    assert "2 camera(s), 3 frame(s); 3 point(s) not written (nerfstudio holds no points)" in out.stdout
    out = run("trajectory", "convert", tmp_path / "transforms.json", "--to", "colmap-binary", "--out", tmp_path / "back")
    assert out.returncode == 0, out.stderr
    back = formats.read_trajectory_set(tmp_path / "back")
    assert all(b.allclose(a, atol=1e-12) for a, b in zip(source.trajectories, back.trajectories))
    assert back.trajectories[0].distortion[0].params == LENSES["OPENCV"]
    assert back.trajectories[0].images == ("dslr/DSC_0012.JPG", "dslr/DSC_0015.JPG")
    # Through the text model and back, the points and their tracks come too; --camera keeps its frames' part of the tracks.
    out = run("trajectory", "convert", tmp_path / "sparse", "--to", "colmap", "--out", tmp_path / "text")
    assert out.returncode == 0 and "3 point(s) as colmap" in out.stdout, out.stderr
    out = run("trajectory", "convert", tmp_path / "text", "--to", "colmap-binary", "--out", tmp_path / "again")
    assert out.returncode == 0, out.stderr
    assert formats.read_trajectory_set(tmp_path / "again").points == source.points
    out = run("trajectory", "convert", tmp_path / "sparse", "--to", "colmap", "--out", tmp_path / "left", "--camera", "left")
    assert out.returncode == 0, out.stderr
    left = formats.read_trajectory_set(tmp_path / "left").points
    assert left.views == (("left", 7),) and [len(left.track(i)) for i in range(3)] == [1, 0, 1]


def test_trajectory_convert_refuses_what_the_target_cannot_hold(tmp_path):
    from test_bridge_distortion import colmap_fixture, write_colmap_binary

    write_colmap_binary(tmp_path / "sparse", colmap_fixture("RADIAL_FISHEYE"))
    out = run("trajectory", "convert", tmp_path / "sparse", "--to", "worldstereo", "--out", tmp_path / "w")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "camera 'dslr' frame 12: camera model RADIAL_FISHEYE cannot be written as worldstereo" in out.stderr


def test_trajectory_convert_errors(tmp_path):
    out = run("trajectory", "convert", tmp_path / "nope.json", "--to", "colmap", "--out", tmp_path / "x")
    assert out.returncode == 2 and "not found" in out.stderr
    out = run("trajectory", "convert", example_camera_files()[0], "--to", "colmap", "--out", tmp_path / "x", "--camera", "Ghost")
    assert out.returncode == 2 and "Ghost" in out.stderr
    out = run("trajectory", "convert", example_camera_files()[0], "--to", "bogus", "--out", tmp_path / "x")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_every_package_folder_is_installed():
    import tomllib

    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"keyframe_worlds"} | {
        "keyframe_worlds." + ".".join(p.parent.relative_to(REPO_ROOT).parts)
        for p in REPO_ROOT.rglob("__init__.py")
        if p.parent != REPO_ROOT and not {".venv", "tests", "build", "dist"} & set(p.relative_to(REPO_ROOT).parts)
    }
    assert listed == on_disk
