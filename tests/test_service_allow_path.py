"""Local-path submissions read only inside the folders given to ``serve --allow-path`` (symlinks resolved),
say nothing about files elsewhere, and their copies are never readable by more users than the source."""

from __future__ import annotations

import json
import os
import stat

import pytest
import requests

from keyframe_worlds.engine.testing.service import Engine, write_preview_job

TIMEOUT = 30


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    spec = write_preview_job(allowed / "job", frames=3)
    write_preview_job(outside / "job", frames=3)
    (allowed / "job" / "escape.png").symlink_to(outside / "job" / "ref.png")
    return allowed, outside, spec


@pytest.fixture(scope="module")
def engine(folders, tmp_path_factory):
    allowed, _, _ = folders
    with Engine(tmp_path_factory.mktemp("allow") / "jobs", extra_args=("--device", "cpu", "--allow-path", str(allowed))) as eng:
        eng.start()
        yield eng


def post(engine, doc, **params):
    return requests.post(f"{engine.url}/v1/jobs", json=doc, params=params, timeout=TIMEOUT,
                         headers={"Authorization": f"Bearer {engine.token}"})


def local(spec, **reference):
    doc = json.loads(spec.read_text())
    doc["reference"] = {k: str(spec.parent / v) for k, v in doc["reference"].items()}
    doc["reference"].update(reference)
    return doc


def test_without_allow_path_only_uploads_are_read(folders, tmp_path):
    _, _, spec = folders
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu")) as eng:
        client = eng.start()
        r = post(eng, local(spec))
        assert r.status_code == 403 and "--allow-path" in r.json()["error"], r.text
        assert client.submit(spec).state in ("pending", "running")  # the upload form still works


def test_inside_is_read_and_outside_or_symlinked_out_is_refused(engine, folders):
    allowed, outside, spec = folders
    assert post(engine, local(spec)).status_code == 201
    cases = {
        "outside": local(spec, image=str(outside / "job" / "ref.png")),
        "missing outside": local(spec, image=str(outside / "job" / "nothing.png")),  # not "file not found": no oracle
        "symlink out": local(spec, image=str(allowed / "job" / "escape.png")),
        "dot-dot": local(spec, image=str(allowed / "job" / ".." / ".." / outside.name / "job" / "ref.png")),
        "depth outside": local(spec, depth=str(outside / "job" / "ref_depth.npy")),
        "depth model outside": {**local(spec), "geometry": {"depth_model": str(outside)}},
    }
    for name, doc in cases.items():
        r = post(engine, doc)
        assert r.status_code == 403, (name, r.status_code, r.text)
        problems = r.json()["problems"]
        assert len(problems) == 1 and problems[0]["path"] in ("reference.image", "reference.depth", "geometry.depth_model"), (name, problems)
        assert "not found" not in r.text, name
    assert "symlink" in post(engine, cases["symlink out"]).json()["problems"][0]["reason"]
    relative = local(spec, image="../../" + outside.name + "/job/ref.png")
    assert post(engine, relative, base_dir=str(allowed / "job")).status_code == 403


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_copies_never_widen_permissions(engine, folders, mode):
    _, _, spec = folders
    image = spec.parent / f"ref_{mode:o}.png"
    image.write_bytes((spec.parent / "ref.png").read_bytes())
    os.chmod(image, mode)
    r = post(engine, local(spec, image=str(image)))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    copy = engine.job_root / job_id / "inputs" / "reference_image.png"
    assert stat.S_IMODE(copy.stat().st_mode) & ~mode == 0, oct(copy.stat().st_mode)
