"""The engine service over real HTTP: a ``keyframe-worlds serve`` subprocess on loopback.

Token, submission (uploads and local paths), errors as JSON, body limit, path
traversal, the OpenAPI document, and ``serve``'s refusals.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess

import pytest
import requests

from conftest import VENV_BIN
from keyframe_worlds.bridge.client import EngineClient, EngineError
from keyframe_worlds.bridge.errors import ValidationError
from keyframe_worlds.bridge.spec import load_manifest
from keyframe_worlds.engine.testing.service import Engine, write_preview_job

TIMEOUT = 20


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("service_api")
    with Engine(root / "jobs", extra_args=("--max-body-mb", "1", "--device", "cpu",
                                                  "--allow-path", str(tmp_path_factory.getbasetemp()))) as eng:
        eng.start()
        yield eng


@pytest.fixture(scope="module")
def finished_job(engine, tmp_path_factory):
    spec = write_preview_job(tmp_path_factory.mktemp("job"), frames=12, segment_length=4)
    status = engine.client.submit(spec)
    final = engine.client.wait(status.id, timeout=60, poll_s=0.05)
    assert final.state == "completed", engine.client.log(status.id)
    return final


def raw(engine, method, path, headers=None, body=None):
    """One request with http.client, so the path goes out exactly as written (no normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def auth(engine):
    return {"Authorization": f"Bearer {engine.token}"}


def test_health_needs_no_token_and_describes_the_engine(engine):
    response = requests.get(f"{engine.url}/v1/health", timeout=TIMEOUT)
    assert response.status_code == 200
    doc = response.json()
    assert doc["status"] == "ok" and doc["device"] == "cpu" and doc["devices"] == ["cpu"]
    assert "preview" in doc["generators"]
    assert isinstance(doc["gpu_memory"], list) and set(doc["jobs"]) == {"pending", "running", "completed", "failed", "cancelled"}


@pytest.mark.parametrize("route", ["GET /v1/jobs", "POST /v1/jobs", "GET /v1/jobs/j20260101-00000000",
                                   "POST /v1/jobs/j20260101-00000000/cancel", "GET /v1/jobs/j20260101-00000000/manifest",
                                   "GET /v1/jobs/j20260101-00000000/files/manifest.json", "GET /v1/openapi.json"])
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-wrong-token", "Basic abc", "Bearer "])
def test_every_route_but_health_needs_the_token(engine, route, header):
    method, path = route.split()
    status, body = raw(engine, method, path, headers={"Authorization": header} if header else {})
    assert status == 401
    doc = json.loads(body)
    assert "token" in doc["error"] and doc["problems"] == []


def test_upload_job_completes_and_its_bundle_downloads(engine, finished_job, tmp_path):
    client = engine.client
    assert finished_job.frames_done == finished_job.frames_total == 12 and finished_job.progress == 1.0
    assert finished_job.error is None and finished_job.attempts == 1
    assert finished_job.id in [j.id for j in client.jobs()]
    client.download_bundle(finished_job.id, tmp_path / "bundle")
    manifest = load_manifest(tmp_path / "bundle", check_files=True)
    assert manifest.job_name == "test" and len(manifest.trajectories[0].frames) == 12
    assert "submitted" in client.log(finished_job.id) and "completed" in client.log(finished_job.id)


def test_local_path_submission(engine, tmp_path):
    spec = write_preview_job(tmp_path, frames=4, segment_length=4, with_depth=False)
    status = engine.client.submit(spec, upload=False)
    assert engine.client.wait(status.id, timeout=60, poll_s=0.05).state == "completed"
    # A relative path without base_dir cannot be resolved by the engine: a field problem, not a guess.
    doc = json.loads(spec.read_text())
    response = requests.post(f"{engine.url}/v1/jobs", json=doc, headers=auth(engine), timeout=TIMEOUT)
    assert response.status_code == 400
    assert [p["path"] for p in response.json()["problems"]] == ["reference.image"]
    response = requests.post(f"{engine.url}/v1/jobs", params={"base_dir": str(tmp_path)}, json=doc, headers=auth(engine), timeout=TIMEOUT)
    assert response.status_code == 201 and response.headers["Location"].endswith(response.json()["id"])
    engine.client.wait(response.json()["id"], timeout=60, poll_s=0.05)


def test_invalid_spec_gets_the_validators_field_paths(engine, tmp_path):
    spec = write_preview_job(tmp_path, frames=3)
    doc = json.loads(spec.read_text())
    doc["generator"] = "magic"
    doc["trajectories"][0]["frames"][1]["fx"] = -5
    files = {"spec": (None, json.dumps(doc)), "image": ("ref.png", (tmp_path / "ref.png").read_bytes()),
             "depth": ("d.npy", (tmp_path / "ref_depth.npy").read_bytes())}
    response = requests.post(f"{engine.url}/v1/jobs", files=files, headers=auth(engine), timeout=TIMEOUT)
    assert response.status_code == 400
    paths = {p["path"] for p in response.json()["problems"]}
    assert paths == {"generator", "trajectories[0].frames[1].fx"}
    # The client raises the project's validation error with the same paths (it checks before uploading).
    with pytest.raises(ValidationError) as caught:
        engine.client.submit(doc, base_dir=tmp_path)
    assert {p.path for p in caught.value.problems} == paths


@pytest.mark.parametrize("case", ["not-json", "bad-content-type", "no-image", "unknown-part", "depth-missing", "image-not-an-image",
                                  "spec-not-object", "garbage-multipart", "two-specs"])
def test_bad_submissions_get_a_json_4xx(engine, tmp_path, case):
    spec = write_preview_job(tmp_path, frames=3)
    doc = json.loads(spec.read_text())
    image = (tmp_path / "ref.png").read_bytes()
    depth = (tmp_path / "ref_depth.npy").read_bytes()
    url, headers = f"{engine.url}/v1/jobs", auth(engine)
    files = {"spec": (None, json.dumps(doc)), "image": ("ref.png", image), "depth": ("d.npy", depth)}
    if case == "not-json":
        response = requests.post(url, data=b"{oops", headers={**headers, "Content-Type": "application/json"}, timeout=TIMEOUT)
    elif case == "bad-content-type":
        response = requests.post(url, data=b"hello", headers={**headers, "Content-Type": "text/plain"}, timeout=TIMEOUT)
    elif case == "garbage-multipart":
        response = requests.post(url, data=b"--x\r\nnonsense", headers={**headers, "Content-Type": "multipart/form-data; boundary=x"}, timeout=TIMEOUT)
    elif case == "two-specs":
        response = requests.post(url, files=[("spec", (None, "{}")), ("spec", (None, "{}")), ("image", ("a.png", image))], headers=headers, timeout=TIMEOUT)
    else:
        if case == "no-image":
            del files["image"]
        elif case == "unknown-part":
            files["weights"] = ("evil.pt", b"\x80\x04")
        elif case == "depth-missing":
            del files["depth"]
        elif case == "image-not-an-image":
            files["image"] = ("ref.png", b"this is not a png")
        elif case == "spec-not-object":
            files["spec"] = (None, "[1, 2, 3]")
        response = requests.post(url, files=files, headers=headers, timeout=TIMEOUT)
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert isinstance(body["error"], str) and body["error"] and isinstance(body["problems"], list)
    if case == "image-not-an-image":
        assert [p["path"] for p in body["problems"]] == ["reference.image"]
    assert requests.get(f"{engine.url}/v1/health", timeout=TIMEOUT).status_code == 200


def test_generator_options_are_checked_before_queueing(engine, tmp_path):
    """The generator's own option check answers 400 with options.* paths; nothing is queued."""
    spec = write_preview_job(tmp_path, frames=3)
    before = len(engine.client.jobs())
    for generator, options, expected in (("preview", {"segment_length": 0}, "options.segment_length"),
                                         ("preview", {"magic": 1}, "options.magic"),
                                         ("worldstereo", {"checkpoint": "x", "offload": "bogus", "steps": -1}, "options.offload"),
                                         ("worldstereo", {"checkpoint": str(tmp_path / "no-weights"), "steps": 0}, "options.steps")):
        doc = {**json.loads(spec.read_text()), "generator": generator, "options": options}
        files = {"spec": (None, json.dumps(doc)), "image": ("ref.png", (tmp_path / "ref.png").read_bytes()),
                 "depth": ("d.npy", (tmp_path / "ref_depth.npy").read_bytes())}
        response = requests.post(f"{engine.url}/v1/jobs", files=files, headers=auth(engine), timeout=TIMEOUT)
        assert response.status_code == 400, response.text
        paths = [p["path"] for p in response.json()["problems"]]
        if generator in engine.client.health().generators:
            assert expected in paths and all(p.startswith("options") for p in paths), paths
            if options.get("offload") == "bogus":  # every problem at once, not the first one
                assert sorted(paths) == ["options.offload", "options.steps"], paths
        else:
            assert paths == ["generator"]
    assert len(engine.client.jobs()) == before


def test_body_limit(engine):
    big = b"x" * (1024 * 1024 + 10)
    response = requests.post(f"{engine.url}/v1/jobs", data=big, headers={**auth(engine), "Content-Type": "application/json"}, timeout=TIMEOUT)
    assert response.status_code == 413 and "too large" in response.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b"y" * 100_000

    response = requests.post(f"{engine.url}/v1/jobs", data=chunks(), headers={**auth(engine), "Content-Type": "application/json"}, timeout=TIMEOUT)
    assert response.status_code == 413 and "too large" in response.json()["error"]
    assert engine.client.health().version


@pytest.mark.parametrize("path", ["../status.json", "..%2fstatus.json", "%2e%2e/%2e%2e/spec.json", "frames/../../log.txt",
                                  "..%5cstatus.json", "%2fetc%2fpasswd", "/etc/passwd", "frames/%2e%2e/%2e%2e/inputs/reference_image.png",
                                  "C:/Windows/win.ini", "escape/status.json", "nul%00.png"])
def test_file_paths_that_leave_the_job_folder_are_refused(engine, finished_job, path):
    folder = engine.job_root / finished_job.id
    link = folder / "out" / "escape"
    if not link.exists():
        link.symlink_to(folder, target_is_directory=True)
    status, body = raw(engine, "GET", f"/v1/jobs/{finished_job.id}/files/{path}", headers=auth(engine))
    assert status in (400, 404), body[:200]
    assert b"job" in body and "error" in json.loads(body)
    ok, content = raw(engine, "GET", f"/v1/jobs/{finished_job.id}/files/points.ply", headers=auth(engine))
    assert ok == 200 and content.startswith(b"ply")


def test_every_bundle_file_is_answered_as_the_documented_octet_stream(engine, finished_job):
    """Found by the OpenAPI fuzz: .exr came back as image/aces (the machine's mime table), undocumented."""
    for path in ("points.ply", "manifest.json", "depth/Cam/000001.exr", "frames/Cam/000001.png"):
        r = requests.get(f"{engine.url}/v1/jobs/{finished_job.id}/files/{path}", headers=auth(engine), timeout=TIMEOUT)
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream", (path, r.headers)


@pytest.mark.parametrize("job_id", ["..", "..%2f..%2fjobs", "j20260101-0000000g", "%00"])
def test_odd_job_ids_are_not_found(engine, job_id):
    status, body = raw(engine, "GET", f"/v1/jobs/{job_id}/manifest", headers=auth(engine))
    assert status == 404 and "error" in json.loads(body)


@pytest.mark.parametrize("method, path", [("GET", "/v1/jobs/a%2Fcancel"), ("DELETE", "/v1/jobs/a%2Fcancel"),
                                          ("POST", "/v1/jobs/x%2Ffiles%2Fy/cancel"), ("GET", "/v1/jobs/a%2F"),
                                          ("GET", "/v1/jobs/a%2Fb%2Fc/log")])
def test_an_encoded_slash_in_a_job_id_is_an_unknown_job_on_the_route_addressed(engine, method, path):
    """Found by the OpenAPI fuzz: the decoded slash re-routed the request (405 for GET a%2Fcancel, a 307
    redirect, a 404 before the token was checked)."""
    status, body = raw(engine, method, path, headers=auth(engine))
    assert status == 404 and "no job" in json.loads(body)["error"], (status, body[:200])
    status, body = raw(engine, method, path)
    assert status == 401, (status, body[:200])


def test_unknown_job_and_cancelling_a_finished_one(engine, finished_job):
    with pytest.raises(EngineError) as caught:
        engine.client.status("j20260101-deadbeef")
    assert caught.value.status == 404
    with pytest.raises(EngineError) as caught:
        engine.client.cancel(finished_job.id)
    assert caught.value.status == 409 and "completed" in str(caught.value)
    assert engine.client.manifest(finished_job.id)["job"]["name"] == "test"


def test_openapi_document_is_served_and_kept_in_the_repository(engine):
    from keyframe_worlds.engine.service.openapi import OPENAPI_PATH, render

    served = requests.get(f"{engine.url}/v1/openapi.json", headers=auth(engine), timeout=TIMEOUT).json()
    stored = json.loads(OPENAPI_PATH.read_text())
    assert stored == json.loads(render()), "run: python -m keyframe_worlds.engine.service.openapi"
    assert served["paths"].keys() == stored["paths"].keys()
    assert {"/v1/health", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/retry",
            "/v1/jobs/{job_id}/manifest", "/v1/jobs/{job_id}/files/{file_path}"} <= set(stored["paths"])
    # the status schema is the bridge's JobStatus, field for field, with its documented words
    from dataclasses import fields

    from keyframe_worlds.bridge.jobs import STATUS_FIELD_DOCS, JobState, JobStatus

    schema = stored["components"]["schemas"]["JobStatusModel"]["properties"]
    assert set(schema) == {f.name for f in fields(JobStatus)}
    assert all(schema[name]["description"] == STATUS_FIELD_DOCS[name] for name in schema)
    assert schema["state"]["type"] == "string" and JobState("running") is JobState.RUNNING


def serve(tmp_path, *args, env_token="x" * 32):
    env = {k: v for k, v in os.environ.items() if k != "KEYFRAME_WORLDS_TOKEN"}
    if env_token is not None:
        env["KEYFRAME_WORLDS_TOKEN"] = env_token
    return subprocess.run([str(VENV_BIN / "keyframe-worlds"), "serve", "--job-root", str(tmp_path / "jobs"), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_serve_refuses_a_remote_address_without_allow_remote(tmp_path):
    out = serve(tmp_path, "--host", "0.0.0.0")
    assert out.returncode == 2 and "--allow-remote" in out.stderr and "READY" not in out.stdout


def test_serve_needs_a_token_from_the_environment_or_a_file(tmp_path):
    out = serve(tmp_path, env_token=None)
    assert out.returncode == 2 and "KEYFRAME_WORLDS_TOKEN" in out.stderr
    out = serve(tmp_path, env_token="short")
    assert out.returncode == 2 and "at least 16" in out.stderr
    out = serve(tmp_path, "--token-file", str(tmp_path / "missing"), env_token=None)
    assert out.returncode == 2 and "token file" in out.stderr
    out = serve(tmp_path, "--token", "x" * 32)
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr


def test_token_file(tmp_path):
    (tmp_path / "token").write_text("t" * 40 + "\n")
    env = {k: v for k, v in os.environ.items() if k != "KEYFRAME_WORLDS_TOKEN"}
    process = subprocess.Popen([str(VENV_BIN / "keyframe-worlds"), "serve", "--job-root", str(tmp_path / "jobs"), "--token-file",
                                str(tmp_path / "token"), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=env)
    try:
        line = process.stdout.readline()
        assert line.startswith("READY port=")
        port = int(line.split("=")[1])
        client = EngineClient(f"http://127.0.0.1:{port}", "t" * 40)
        assert client.jobs() == []
        with pytest.raises(EngineError) as caught:
            EngineClient(f"http://127.0.0.1:{port}", "u" * 40).jobs()
        assert caught.value.status == 401
    finally:
        process.kill()
        process.wait(10)
