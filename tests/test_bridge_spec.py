"""Job spec v1 and result manifest v1: every problem is reported with its field path; junk never raises."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyframe_worlds.bridge import spec
from keyframe_worlds.bridge.errors import ValidationError

from conftest import make_trajectory


@pytest.fixture
def job_dir(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48)).save(tmp_path / "ref.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    np.save(tmp_path / "ref_depth.npy", np.ones((48, 64), np.float32))
    return tmp_path


def valid_job() -> dict:
    return {
        "version": 1,
        "name": "shot010",
        "generator": "preview",
        "prompt": "a street at dusk",
        "seed": 7,
        "reference": {"image": "ref.png", "depth": "ref_depth.npy"},
        "trajectories": [make_trajectory("CamA", 4, seed=1).to_json(), make_trajectory("CamB", 3, seed=2).to_json()],
        "output": {"mesh_every": 2, "mesh_stride": 4, "point_budget": 100000},
        "options": {},
    }


def paths(problems) -> list[str]:
    return [p.path for p in problems]


def test_valid_job_parses_and_round_trips(job_dir):
    doc = valid_job()
    assert spec.validate_job(doc, base_dir=job_dir) == []
    job = spec.JobSpec.from_json(doc, base_dir=job_dir)
    assert [t.name for t in job.trajectories] == ["CamA", "CamB"]
    again = spec.JobSpec.from_json(json.loads(json.dumps(job.to_json())), base_dir=job_dir)
    assert again.to_json() == job.to_json()
    traj, index = job.reference_view()
    assert (traj.name, index) == ("CamA", 0)


def test_load_job_resolves_paths_against_the_spec_folder(job_dir):
    (job_dir / "job.json").write_text(json.dumps(valid_job()))
    job = spec.load_job(job_dir / "job.json")
    assert job.reference.image == str((job_dir / "ref.png").resolve())
    assert job.reference.depth == str((job_dir / "ref_depth.npy").resolve())


CASES = [
    ("non-finite", lambda d: d["trajectories"][0]["frames"][1]["c2w_opencv"][0].__setitem__(3, math.nan), "trajectories[0].frames[1].c2w_opencv", "non-finite"),
    ("not orthonormal", lambda d: d["trajectories"][0]["frames"][0]["c2w_opencv"][0].__setitem__(1, 0.5), "trajectories[0].frames[0].c2w_opencv", "orthonormal"),
    ("scale", lambda d: [row.__setitem__(0, row[0] * 2) for row in d["trajectories"][1]["frames"][2]["c2w_opencv"][:3]], "trajectories[1].frames[2].c2w_opencv", "scale"),
    ("reflection", lambda d: [row.__setitem__(2, -row[2]) for row in d["trajectories"][0]["frames"][0]["c2w_opencv"][:3]], "trajectories[0].frames[0].c2w_opencv", "reflection"),
    ("focal", lambda d: d["trajectories"][0]["frames"][2].__setitem__("fx", 0.0), "trajectories[0].frames[2].fx", "positive"),
    ("size", lambda d: d["trajectories"][0].__setitem__("width", -5), "trajectories[0].width", "at least"),
    ("too big", lambda d: d["trajectories"][1].__setitem__("height", 100000), "trajectories[1].height", "at most"),
    ("order", lambda d: d["trajectories"][0]["frames"][2].__setitem__("frame", d["trajectories"][0]["frames"][1]["frame"]), "trajectories[0].frames[2].frame", "strictly increasing"),
    ("empty", lambda d: d["trajectories"][1].__setitem__("frames", []), "trajectories[1].frames", "empty"),
    ("no trajectories", lambda d: d.__setitem__("trajectories", []), "trajectories", "empty"),
    ("generator", lambda d: d.__setitem__("generator", "sora"), "generator", "unknown generator"),
    ("missing image", lambda d: d["reference"].__setitem__("image", "nope.png"), "reference.image", "not found"),
    ("broken image", lambda d: d["reference"].__setitem__("image", "broken.png"), "reference.image", "not a readable"),
    ("no image", lambda d: d["reference"].pop("image"), "reference.image", "required"),
    ("version", lambda d: d.__setitem__("version", 2), "version", "unsupported"),
    ("type", lambda d: d.__setitem__("seed", "seven"), "seed", "integer"),
    ("bool is no number", lambda d: d["trajectories"][0]["frames"][0].__setitem__("cy", True), "trajectories[0].frames[0].cy", "number"),
    ("duplicate camera", lambda d: d["trajectories"][1].__setitem__("name", "CamA"), "trajectories[1].name", "duplicate"),
    ("unknown field", lambda d: d.__setitem__("colour", "red"), "colour", "unknown field"),
    ("reference frame", lambda d: d["reference"].__setitem__("frame", 99999), "reference.frame", "not in trajectory"),
    ("matrix shape", lambda d: d["trajectories"][0]["frames"][0].__setitem__("c2w_opencv", [[1, 0, 0], [0, 1, 0]]), "trajectories[0].frames[0].c2w_opencv", "4x4"),
]


@pytest.mark.parametrize("name,mutate,path,reason", CASES, ids=[c[0] for c in CASES])
def test_each_problem_names_its_field(job_dir, name, mutate, path, reason):
    doc = valid_job()
    mutate(doc)
    problems = spec.validate_job(doc, base_dir=job_dir)
    assert path in paths(problems), problems
    assert any(reason in p.reason for p in problems if p.path == path), problems


def test_all_problems_are_reported_at_once(job_dir):
    doc = valid_job()
    for _name, mutate, _path, _reason in CASES[:8]:
        mutate(doc)
    problems = spec.validate_job(doc, base_dir=job_dir)
    for _name, _mutate, path, _reason in CASES[:8]:
        assert path in paths(problems)
    with pytest.raises(ValidationError) as err:
        spec.JobSpec.from_json(doc, base_dir=job_dir)
    assert len(err.value.problems) == len(problems)
    assert "trajectories[0].frames[1].c2w_opencv" in str(err.value)


def test_file_checks_can_be_skipped(job_dir):
    doc = valid_job()
    doc["reference"]["image"] = "elsewhere.png"
    assert spec.validate_job(doc, base_dir=job_dir, check_files=False) == []


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(json_value)
def test_random_junk_never_raises(doc):
    problems = spec.validate_job(doc)
    assert isinstance(problems, list) and problems
    assert all(isinstance(p.path, str) and p.reason for p in problems)
    assert spec.validate_manifest(doc)


def _mutations():
    keys = st.sampled_from(["version", "name", "generator", "seed", "reference", "trajectories", "output", "prompt"])
    return st.lists(st.tuples(keys, json_value), min_size=1, max_size=3)


@settings(max_examples=300, deadline=None)
@given(_mutations())
def test_mutated_valid_job_never_raises(mutations):
    doc = valid_job()
    for key, value in mutations:
        doc[key] = value
    problems = spec.validate_job(doc, check_files=False)
    assert isinstance(problems, list)
    if not problems:
        spec.JobSpec.from_json(doc, check_files=False)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 3), st.integers(0, 3), st.sampled_from(["fx", "cx", "frame", "c2w_opencv"]), json_value)
def test_mutated_frame_never_raises(t, f, key, value):
    doc = valid_job()
    frames = doc["trajectories"][t % 2]["frames"]
    frames[f % len(frames)][key] = value
    assert isinstance(spec.validate_job(doc, check_files=False), list)


# --- result manifest -------------------------------------------------------------


def make_bundle(tmp_path):
    traj = make_trajectory("CamA", 3, seed=4)
    frames = []
    for frame in traj.frames.tolist():
        for sub in ("frames", "depth"):
            (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / f"frames/{frame:06d}.png").write_bytes(b"png")
        (tmp_path / f"depth/{frame:06d}.npy").write_bytes(b"npy")
        frames.append(spec.ResultFrame(frame, f"frames/{frame:06d}.png", f"depth/{frame:06d}.npy"))
    (tmp_path / "world.ply").write_bytes(b"ply")
    (tmp_path / "mesh.ply").write_bytes(b"ply")
    (tmp_path / "mesh.png").write_bytes(b"png")
    manifest = spec.ResultManifest(
        job_name="shot", generator="preview", generator_label="geometric preview",
        trajectories=(spec.ResultTrajectory(traj, tuple(frames), None),),
        point_cloud="world.ply", point_count=10,
        meshes=(spec.ResultMesh("CamA", int(traj.frames[0]), "mesh.ply", "mesh.png"),),
    )
    spec.write_json_atomic(tmp_path / spec.MANIFEST_FILENAME, manifest.to_json())
    return manifest


def test_manifest_round_trip_with_files(tmp_path):
    manifest = make_bundle(tmp_path)
    loaded = spec.load_manifest(tmp_path)
    assert loaded.to_json() == manifest.to_json()
    assert loaded.trajectories[0].trajectory.allclose(manifest.trajectories[0].trajectory, atol=0)


def test_manifest_missing_file_and_escaping_path(tmp_path):
    manifest = make_bundle(tmp_path)
    doc = manifest.to_json()
    (tmp_path / doc["trajectories"][0]["files"][1]["image"]).unlink()
    doc["meshes"][0]["path"] = "../../etc/passwd"
    doc["point_cloud"]["path"] = "/abs/world.ply"
    problems = spec.validate_manifest(doc, tmp_path)
    assert "trajectories[0].files[1].image" in paths(problems)
    assert "meshes[0].path" in paths(problems)
    assert "point_cloud.path" in paths(problems)
    assert any("inside the bundle" in p.reason for p in problems)


def test_manifest_frames_must_match_cameras(tmp_path):
    doc = make_bundle(tmp_path).to_json()
    doc["trajectories"][0]["files"][0]["frame"] += 100
    doc["meshes"][0]["trajectory"] = "Nobody"
    problems = spec.validate_manifest(doc, tmp_path)
    assert "trajectories[0].files[0].frame" in paths(problems)
    assert "meshes[0].trajectory" in paths(problems)


def test_write_json_atomic_leaves_no_temporary(tmp_path):
    spec.write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
