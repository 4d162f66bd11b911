"""Shots to a render farm: job folders from the demo scene and the Open Job Description template that runs them.

Everything is real: the demo's street scene in the bpy module from PyPI, `keyframe-worlds scene farm` as a
subprocess, the Open Job Description runtime from PyPI (`openjd check`, `openjd run` as AWS Deadline Cloud workers
run a template) running the engine's own Python, and each bundle validated.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import yaml

from conftest import REPO_ROOT, VENV_BIN
from test_headless import load_demo, run

from keyframe_worlds.bridge.seed import write_seed_ply
from keyframe_worlds.bridge.spec import load_manifest, validate_manifest
from keyframe_worlds.engine.testing.service import write_preview_job

OPENJD = str(VENV_BIN / "openjd")


def openjd(*args, timeout=300):
    return subprocess.run([OPENJD, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def farm_blend(tmp_path_factory):
    """The demo's street, small: 10 frames at 64x36 (the Crane's marker at frame 5), saved to a .blend."""
    folder = tmp_path_factory.mktemp("farm_scene")
    code = (
        "import sys, bpy\n"
        f"sys.path.insert(0, {str(REPO_ROOT / 'scripts')!r})\n"
        "import demo\n"
        "demo.build_scene(10, 64, 36)\n"
        f"bpy.ops.wm.save_as_mainfile(filepath={str(folder / 'scene.blend')!r})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return folder / "scene.blend"


def frames_of(job_dir):
    doc = json.loads((job_dir / "job.json").read_text())
    return [t["name"] for t in doc["trajectories"]], [f["frame"] for t in doc["trajectories"] for f in t["frames"]]


def test_the_demo_scenes_two_cameras_become_two_job_folders_that_openjd_runs_and_validates(farm_blend, tmp_path):
    farm = tmp_path / "farm"
    out = run("scene", "farm", "--blend", farm_blend, "--out", farm, "--samples", "1")
    assert out.returncode == 0, out.stderr
    # One job folder per marker-bound camera, each over its shot: the Dolly up to the Crane's marker, then the Crane.
    assert sorted(p.name for p in farm.iterdir()) == ["01_Dolly", "02_Crane", "template.yaml"]
    assert frames_of(farm / "01_Dolly") == (["Dolly"], [1, 2, 3, 4])
    assert frames_of(farm / "02_Crane") == (["Crane"], [5, 6, 7, 8, 9, 10])
    for shot in ("01_Dolly", "02_Crane"):
        doc = json.loads((farm / shot / "job.json").read_text())
        assert doc["reference"]["image"] == "reference.png" and doc["reference"]["depth"] == "reference_depth.npy"
        assert doc["options"] == {} and "geometry" not in doc  # no model path of this machine travels with the job

    template = farm / "template.yaml"
    checked = openjd("check", template)
    assert checked.returncode == 0 and "passes validation checks" in checked.stdout, checked.stdout + checked.stderr
    # The model package of the same runtime reads it as a job template, with one task per job folder in each step.
    from openjd.model import decode_job_template

    decoded = decode_job_template(template=yaml.safe_load(template.read_text()))
    assert decoded.specificationVersion.value == "jobtemplate-2023-09"
    assert [s.name for s in decoded.steps] == ["Generate", "Validate"]
    for step in decoded.steps:
        (shots,) = step.parameterSpace.taskParameterDefinitions
        assert list(shots.range) == ["01_Dolly", "02_Crane"]
    assert {p.name for p in decoded.parameterDefinitions} == {"EnginePython", "ModelDir", "OutputDir", "JobsDir"}

    bundles = tmp_path / "bundles"
    ran = openjd("run", template, "--step", "Validate", "--run-dependencies",
                 "-p", f"EnginePython={sys.executable}", "-p", f"OutputDir={bundles}")
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-2000:]
    log = ran.stdout
    assert "Running step 'Generate'" in log and "Running step 'Validate'" in log
    for shot, frames in (("01_Dolly", 4), ("02_Crane", 6)):
        assert f"wrote {bundles / shot}: {frames} frame(s)" in log
        assert f"{bundles / shot / 'manifest.json'}: valid result manifest" in log  # the template's Validate step
        assert validate_manifest(json.loads((bundles / shot / "manifest.json").read_text()), bundles / shot) == []
        manifest = load_manifest(bundles / shot)
        assert manifest.job_name == shot and [len(t.frames) for t in manifest.trajectories] == [frames]


def test_named_cameras_make_one_job_each_over_the_whole_range(farm_blend, tmp_path):
    out = run("scene", "--blend", farm_blend, "farm", "--camera", "Crane", "--camera", "Dolly", "--frames", "3-8",
              "--step", "2", "--depth", "none", "--samples", "1", "--out", tmp_path / "f")
    assert out.returncode == 0, out.stderr
    assert frames_of(tmp_path / "f" / "Crane") == (["Crane"], [3, 5, 7])
    assert frames_of(tmp_path / "f" / "Dolly") == (["Dolly"], [3, 5, 7])
    assert "depth" not in json.loads((tmp_path / "f" / "Dolly" / "job.json").read_text())["reference"]
    assert openjd("check", tmp_path / "f" / "template.yaml").returncode == 0


def test_export_for_farm_operator(blank_blend, tmp_path):
    bpy = blank_blend
    import keyframe_worlds

    load_demo().build_scene(8, 64, 36)
    keyframe_worlds.register()
    try:
        props = bpy.context.scene.keyframe_worlds
        props.cameras, props.depth = "MARKERS", "NONE"
        props.generator, props.variant = "worldstereo", "worldstereo-memory"
        assert bpy.ops.keyframe_worlds.export_farm(directory=str(tmp_path / "farm")) == {"FINISHED"}
    finally:
        keyframe_worlds.unregister()
    doc = json.loads((tmp_path / "farm" / "02_Crane" / "job.json").read_text())
    assert doc["generator"] == "worldstereo" and doc["options"] == {"variant": "worldstereo-memory", "offload": "none"}
    template = yaml.safe_load((tmp_path / "farm" / "template.yaml").read_text())
    # A worldstereo job asks the farm for a GPU per Generate task.
    assert template["steps"][0]["hostRequirements"] == {"amounts": [{"name": "amount.worker.gpu", "min": 1}]}
    assert openjd("check", tmp_path / "farm" / "template.yaml").returncode == 0


def test_farm_openjd_command_yaml_and_json_agree_and_relative_defaults(tmp_path):
    jobs = tmp_path / "jobs"
    for name in ("a", "b/c"):
        write_preview_job(jobs / name, frames=3, segment_length=3)
    tricky = 'Shots: "night" #2 — café, yes'
    out = run("farm", "openjd", jobs / "a", jobs / "b" / "c", "--out", jobs / "t.yaml", "--name", tricky,
              "--engine-python", sys.executable)
    assert out.returncode == 0, out.stderr
    elsewhere = tmp_path / "templates" / "t.json"
    assert run("farm", "openjd", jobs / "a", jobs / "b" / "c", "--out", elsewhere, "--name", tricky,
               "--engine-python", sys.executable).returncode == 0
    from_yaml = yaml.safe_load((jobs / "t.yaml").read_text(encoding="utf-8"))
    from_json = json.loads(elsewhere.read_text())
    params = {p["name"]: p for p in from_yaml["parameterDefinitions"]}
    assert from_yaml["name"] == tricky and params["EnginePython"]["default"] == sys.executable
    assert from_yaml["steps"][0]["parameterSpace"]["taskParameterDefinitions"][0]["range"] == ["a", "b/c"]
    # JobsDir defaults relative to the template (Open Job Description joins it to the template's folder) where it
    # can; a template outside the jobs' folder cannot walk up to them, so there the submitter gives JobsDir.
    assert params["JobsDir"]["default"] == "."
    assert "default" not in {p["name"]: p for p in from_json["parameterDefinitions"]}["JobsDir"]
    from_json["parameterDefinitions"] = from_yaml["parameterDefinitions"]
    assert from_yaml == from_json
    assert openjd("check", jobs / "t.yaml").returncode == 0 and openjd("check", elsewhere).returncode == 0


def test_farm_openjd_refuses_what_ties_a_job_to_this_machine(tmp_path):
    spec = write_preview_job(tmp_path / "abs", frames=3, segment_length=3)
    doc = json.loads(spec.read_text())
    doc["reference"]["image"] = str(tmp_path / "abs" / "ref.png")
    doc["geometry"] = {"depth_model": str(tmp_path)}
    write_seed_ply(tmp_path / "scan.ply", np.zeros((4, 3), np.float32))
    doc["reference"]["points"] = "../scan.ply"
    spec.write_text(json.dumps(doc))
    out = run("farm", "openjd", tmp_path / "abs", "--out", tmp_path / "t.yaml")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "reference.image" in out.stderr and "outside the job folder" in out.stderr
    assert "reference.points: '../scan.ply' is outside the job folder" in out.stderr
    assert "geometry.depth_model" in out.stderr and "KEYFRAME_WORLDS_DEPTH_MODEL" in out.stderr
    assert not (tmp_path / "t.yaml").exists()
    (tmp_path / "empty").mkdir()
    out = run("farm", "openjd", tmp_path / "empty", "--out", tmp_path / "t.yaml")
    assert out.returncode == 2 and "not a job folder (no job.json)" in out.stderr and "Traceback" not in out.stderr
    out = run("farm", "openjd", tmp_path / "abs", "--out", tmp_path / "t.txt")
    assert out.returncode == 2 and ".yaml, .yml or .json" in out.stderr


def test_farm_openjd_refuses_reference_views_whose_images_leave_the_folder(tmp_path):
    from keyframe_worlds.bridge.formats import write_trajectories
    from keyframe_worlds.bridge.trajectory import Trajectory

    spec = write_preview_job(tmp_path / "job", frames=3, segment_length=3)
    doc = json.loads(spec.read_text())
    ref = doc["trajectories"][0]
    frame = ref["frames"][0]
    view = Trajectory("Views", np.array([1]), np.array([frame["c2w_opencv"]]), *(np.array([frame[k]]) for k in ("fx", "fy", "cx", "cy")),
                      ref["width"], ref["height"], images=("../../outside.png",))
    (tmp_path / "outside.png").write_bytes((tmp_path / "job" / doc["reference"]["image"]).read_bytes())
    write_trajectories([view], tmp_path / "job" / "views" / "views.json", "keyframe-worlds")
    doc["reference"]["views"] = "views/views.json"
    spec.write_text(json.dumps(doc))
    out = run("farm", "openjd", tmp_path / "job", "--out", tmp_path / "t.yaml")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "reference.views: 1 of its images lie outside the job folder" in out.stderr, out.stderr
    # Inside the folder, the same views are fine.
    shutil.copy(tmp_path / "outside.png", tmp_path / "job" / "views" / "inside.png")
    write_trajectories([replace(view, images=("inside.png",))], tmp_path / "job" / "views" / "views.json", "keyframe-worlds")
    assert run("farm", "openjd", tmp_path / "job", "--out", tmp_path / "t.yaml").returncode == 0
