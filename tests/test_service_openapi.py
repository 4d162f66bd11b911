"""The OpenAPI document says what a real ``serve`` does: every documented error is JSON and answered as
documented (415, the log's 404), no undocumented 422, and the job body schema requires exactly what the
server's validator requires, at every level."""

from __future__ import annotations

import json

import pytest
import requests

from keyframe_worlds.bridge.spec import validate_job
from keyframe_worlds.engine.service.app import UPLOAD_FIELDS
from keyframe_worlds.engine.testing.service import Engine, write_preview_job

TIMEOUT = 20


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with Engine(tmp_path_factory.mktemp("openapi") / "jobs",
                extra_args=("--device", "cpu", "--allow-path", str(tmp_path_factory.getbasetemp()))) as eng:
        eng.start()
        yield eng


@pytest.fixture(scope="module")
def document(engine):
    r = requests.get(f"{engine.url}/v1/openapi.json", headers={"Authorization": f"Bearer {engine.token}"}, timeout=TIMEOUT)
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openapi_job")
    doc = json.loads(write_preview_job(folder, frames=3).read_text())
    doc["reference"] = {k: str(folder / v) for k, v in doc["reference"].items()}
    assert validate_job(doc, base_dir="/", check_files=True) == []
    return doc


def test_every_documented_error_is_json_and_no_422_is_documented(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for code, response in operation["responses"].items():
                assert code != "422", f"{method} {path} documents FastAPI's 422, which this server never answers"
                if code[0] in "45":
                    assert list(response["content"]) == ["application/json"], (method, path, code)
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorModel"}


def test_415_is_documented_and_answered(engine, document):
    assert "415" in document["paths"]["/v1/jobs"]["post"]["responses"]
    r = requests.post(f"{engine.url}/v1/jobs", data=b"hello", timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {engine.token}", "Content-Type": "text/plain"})
    assert r.status_code == 415 and r.headers["content-type"].startswith("application/json")
    assert set(r.json()) == {"error", "problems"}


def test_the_logs_404_is_the_documented_json(engine, document):
    responses = document["paths"]["/v1/jobs/{job_id}/log"]["get"]["responses"]
    assert "application/json" in responses["404"]["content"] and "text/plain" in responses["200"]["content"]
    r = requests.get(f"{engine.url}/v1/jobs/j20260101-00000000/log", headers={"Authorization": f"Bearer {engine.token}"},
                     timeout=TIMEOUT)
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json") and "error" in r.json()


def _levels(doc: dict, schema: dict):
    """(name, the object in a valid spec, its schema) for every object level the schema describes."""
    yield "spec", doc, schema
    props = schema["properties"]
    yield "reference", doc["reference"], props["reference"]
    yield "trajectory", doc["trajectories"][0], props["trajectories"]["items"]
    yield "frame", doc["trajectories"][0]["frames"][0], props["trajectories"]["items"]["properties"]["frames"]["items"]
    yield "output", doc["output"], props["output"]


@pytest.mark.parametrize("content", ["application/json", "multipart/form-data"])
def test_the_job_schema_requires_what_the_server_requires(engine, document, valid, content):
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"][content]["schema"]
    schema = body if content == "application/json" else body["properties"]["spec"]["contentSchema"]
    headers = {"Authorization": f"Bearer {engine.token}", "Content-Type": "application/json"}
    for name, part, part_schema in _levels(json.loads(json.dumps(valid)), schema):
        required = set(part_schema.get("required", ()))
        assert required <= set(part_schema["properties"]), name
        for key in part_schema["properties"]:
            if key not in part:
                continue
            saved = part.pop(key)
            try:
                problems = validate_job(valid_copy := _root(valid, name, part), base_dir="/", check_files=True)
            finally:
                part[key] = saved
            assert bool(problems) == (key in required), f"{name}.{key}: schema says required={key in required}, validator {problems}"
            if key in required and name == "spec":  # and the real server agrees
                r = requests.post(f"{engine.url}/v1/jobs", data=json.dumps(valid_copy), headers=headers, timeout=TIMEOUT)
                assert r.status_code == 400 and key in [p["path"] for p in r.json()["problems"]], (key, r.text)
        if part_schema.get("additionalProperties") is False:
            part["surprise"] = 1
            try:
                problems = validate_job(_root(valid, name, part), base_dir="/", check_files=True)
            finally:
                del part["surprise"]
            assert any(p.path.endswith("surprise") for p in problems), name


def _root(valid: dict, name: str, part: dict) -> dict:
    """The whole spec with ``part`` (a mutated copy of level ``name``) in its place."""
    doc = json.loads(json.dumps(valid))
    if name == "spec":
        return json.loads(json.dumps(part))
    if name in ("reference", "output"):
        doc[name] = part
    elif name == "trajectory":
        doc["trajectories"][0] = part
    elif name == "frame":
        doc["trajectories"][0]["frames"][0] = part
    return json.loads(json.dumps(doc))


def test_a_405_allows_every_documented_method_of_the_path(engine, document):
    """Found probing what the fuzz sends: PUT /v1/jobs answered ``Allow: POST`` (Starlette names the first
    route's methods only), though GET /v1/jobs is documented and answered too."""
    for path, method, allowed in (("/v1/jobs", "PUT", "GET, POST"), ("/v1/jobs/j20260101-00000000", "PATCH", "DELETE, GET")):
        r = requests.request(method, f"{engine.url}{path}", headers={"Authorization": f"Bearer {engine.token}"}, timeout=TIMEOUT)
        assert r.status_code == 405 and r.headers["allow"] == allowed, (path, r.headers)
        assert r.json()["error"]


def test_the_multipart_schema_admits_no_part_the_server_refuses(engine, document, valid):
    schema = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["additionalProperties"] is False and set(schema["properties"]) == set(UPLOAD_FIELDS)
    image = open(valid["reference"]["image"], "rb").read()
    spec = {**valid, "reference": {"image": "ref.png"}}
    r = requests.post(f"{engine.url}/v1/jobs", headers={"Authorization": f"Bearer {engine.token}"}, timeout=TIMEOUT,
                      files={"spec": (None, json.dumps(spec)), "image": ("ref.png", image), "extra": (None, "1")})
    assert r.status_code == 400 and [p["path"] for p in r.json()["problems"]] == ["extra"]
