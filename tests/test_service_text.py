"""Text that is not UTF-8 (a lone surrogate, valid JSON as ``"\\ud800"``) against a real server and the real CLI.

Each is refused with a 4xx naming the field before any job exists; a job an
older engine stored with such text, or with a broken status, never breaks
listing the others, after a restart too.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

from conftest import VENV_BIN
from keyframe_worlds.engine.testing.service import Engine, write_preview_job

TIMEOUT = 20
BAD = "\ud800"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("service_text")
    with Engine(root / "jobs", extra_args=("--device", "cpu", "--allow-path", str(tmp_path_factory.getbasetemp()))) as eng:
        eng.start()
        yield eng


@pytest.fixture
def spec(tmp_path):
    return write_preview_job(tmp_path, frames=3)


def auth(engine):
    return {"Authorization": f"Bearer {engine.token}"}


def placements(doc, folder):
    """(field path, spec with a lone surrogate there) for every kind of place text can be."""
    def local(d):
        d["reference"] = {k: str(folder / v) for k, v in d["reference"].items()}
        return d

    out = []
    d = local(json.loads(json.dumps(doc))); d["name"] = f"shot{BAD}"; out.append(("name", d))
    d = local(json.loads(json.dumps(doc))); d[f"x{BAD}"] = 1; out.append(("x\\ud800", d))
    d = local(json.loads(json.dumps(doc))); d["reference"]["image"] = str(folder / f"ref{BAD}.png"); out.append(("reference.image", d))
    d = local(json.loads(json.dumps(doc))); d["options"][f"k{BAD}"] = 1; out.append(("options.k\\ud800", d))
    d = local(json.loads(json.dumps(doc))); d["trajectories"][0]["name"] = f"Cam{BAD}"
    d["reference"]["trajectory"] = f"Cam{BAD}"; out.append(("trajectories[0].name", d))
    d = local(json.loads(json.dumps(doc))); d["prompt"] = BAD; out.append(("prompt", d))
    return out


def test_lone_surrogates_are_refused_with_the_field_and_no_job_is_made(engine, spec):
    doc = json.loads(spec.read_text())
    before = requests.get(f"{engine.url}/v1/jobs", headers=auth(engine), timeout=TIMEOUT).json()["jobs"]
    for path, bad in placements(doc, spec.parent):
        body = json.dumps(bad)  # ensure_ascii: the surrogate travels as the valid JSON escape \ud800
        assert "\\ud800" in body
        r = requests.post(f"{engine.url}/v1/jobs", data=body.encode(), timeout=TIMEOUT,
                          headers={**auth(engine), "Content-Type": "application/json"})
        assert r.status_code == 400, (path, r.status_code, r.text)
        paths = [p["path"] for p in r.json()["problems"]]
        assert path in paths, (path, paths)
        assert all("UTF-8" in p["reason"] for p in r.json()["problems"])
    # multipart: the spec part carries the escape
    bad = json.loads(spec.read_text())
    bad["name"] = BAD
    files = {"spec": (None, json.dumps(bad)), "image": ("ref.png", (spec.parent / "ref.png").read_bytes()),
             "depth": ("ref_depth.npy", (spec.parent / "ref_depth.npy").read_bytes())}
    r = requests.post(f"{engine.url}/v1/jobs", files=files, headers=auth(engine), timeout=TIMEOUT)
    assert r.status_code == 400 and [p["path"] for p in r.json()["problems"]] == ["name"], r.text
    listed = requests.get(f"{engine.url}/v1/jobs", headers=auth(engine), timeout=TIMEOUT)
    assert listed.status_code == 200 and listed.json()["jobs"] == before
    assert requests.get(f"{engine.url}/v1/health", timeout=TIMEOUT).status_code == 200


def stored_job(root, job_id, seq, **fields):
    folder = root / job_id
    (folder / "inputs").mkdir(parents=True)
    status = {"id": job_id, "seq": seq, "name": "ok", "generator": "preview", "state": "completed", "stage": "done",
              "progress": 1.0, "created": 1.0, **fields}
    (folder / "status.json").write_text(json.dumps(status))  # ensure_ascii: a surrogate is stored as its escape
    return folder


def test_a_bad_stored_job_never_breaks_listing_the_others(tmp_path):
    root = tmp_path / "jobs"
    stored_job(root, "j20260101-00000001", 1, name="good")
    stored_job(root, "j20260101-00000002", 2, name=f"old{BAD}")  # what an older engine accepted
    stored_job(root, "j20260101-00000003", 3, progress="half")  # wrong type
    stored_job(root, "j20260101-00000004", 4, frames_done=None)
    (root / "j20260101-00000005").mkdir()
    (root / "j20260101-00000005" / "status.json").write_bytes(b"\xff\xfe not json")
    for _ in range(2):  # after a restart too
        with Engine(root, extra_args=("--device", "cpu")) as eng:
            eng.start()
            r = requests.get(f"{eng.url}/v1/jobs", headers=auth(eng), timeout=TIMEOUT)
            assert r.status_code == 200, r.text
            jobs = {j["id"]: j for j in r.json()["jobs"]}
            assert set(jobs) == {"j20260101-00000001", "j20260101-00000002"}
            assert jobs["j20260101-00000002"]["name"] == "old\\ud800"
            one = requests.get(f"{eng.url}/v1/jobs/j20260101-00000002", headers=auth(eng), timeout=TIMEOUT)
            assert one.status_code == 200
            assert requests.get(f"{eng.url}/v1/health", timeout=TIMEOUT).json()["jobs"]["completed"] == 2


def test_cli_validate_names_the_field_without_a_traceback(spec):
    doc = json.loads(spec.read_text())
    doc["trajectories"][0]["name"] = f"Cam{BAD}"
    spec.write_text(json.dumps(doc))
    result = subprocess.run([str(VENV_BIN / "keyframe-worlds"), "validate", str(spec)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "trajectories[0].name: is not valid UTF-8 text" in result.stderr
