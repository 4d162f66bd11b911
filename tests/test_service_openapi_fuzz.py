"""The engine service fuzzed from its own OpenAPI document (schemathesis) against a real ``serve``.

Every operation the served ``/v1/openapi.json`` lists is sent schemathesis-generated requests: with the
token, without it and with a wrong one; schema-valid and (where the document constrains anything)
schema-invalid; on real jobs in every finished state as well as on made-up ids. Every answer must be no
5xx, a status code the document lists for that operation, a documented content type, and a body (and
headers) that conform to the documented schema. Bounded: a fixed number of examples per operation, drawn
deterministically (derandomize), so CI sees the same requests every run.
"""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from keyframe_worlds.engine.service.openapi import OPENAPI_PATH
from keyframe_worlds.engine.testing.service import Engine, wait_for, write_preview_job

TIMEOUT = 20
# The document's own checks: no 5xx, documented status and content type, headers and body as documented.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
# Requests the document calls invalid must also be refused (4xx), not half-accepted.
NEGATIVE_CHECKS = CHECKS + [negative_data_rejection]
EXAMPLES = 25  # per operation and kind; the whole file stays well under a minute on 2 cores
# A fixed number of examples, each within a generous deadline (a request answers in milliseconds; the slack is
# for a shared CI machine), drawn the same every run (derandomize, no example database).
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=15), derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
UNKNOWN_JOB = "j20260101-00000000"  # well-formed, never created

# The operations of the committed document, DELETE last (it removes the jobs the others are sent to).
_DOCUMENT = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))
OPERATIONS = sorted(((method.upper(), path) for path, item in _DOCUMENT["paths"].items() for method in item),
                    key=lambda op: (op[0] == "DELETE", op[1], op[0]))


def _cases_label(op) -> str:
    return f"{op[0]} {op[1]}"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("openapi_fuzz")
    with Engine(root / "jobs", extra_args=("--device", "cpu", "--queue-size", "4",
                                          "--allow-path", str(tmp_path_factory.getbasetemp()))) as eng:
        eng.start()
        yield eng


@pytest.fixture(scope="module")
def auth(engine) -> dict:
    return {"Authorization": f"Bearer {engine.token}"}


@pytest.fixture(scope="module")
def document(engine, auth) -> dict:
    r = requests.get(f"{engine.url}/v1/openapi.json", headers=dict(auth), timeout=TIMEOUT)
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def schema(document):
    return schemathesis.openapi.from_dict(document)


@pytest.fixture(scope="module")
def session():
    s = requests.Session()
    yield s
    s.close()


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openapi_fuzz_job")
    write_preview_job(folder, frames=3)
    return folder


@pytest.fixture(scope="module")
def jobs(engine, job_folder) -> dict:
    """Real jobs for the id routes: one completed (with a bundle to fetch files of), one cancelled while queued."""
    client = engine.client
    spec = job_folder / "job.json"
    completed = client.wait(client.submit(spec).id, timeout=60, poll_s=0.05)
    assert completed.state == "completed", client.log(completed.id)
    slow = write_preview_job(job_folder / "slow", frames=400, segment_length=2, name="slow")
    running = client.submit(slow)
    wait_for(lambda: client.status(running.id).state == "running", timeout=60, what="the slow job to run")
    cancelled = client.submit(spec)
    assert client.cancel(cancelled.id).state == "cancelled"
    client.cancel(running.id)
    wait_for(lambda: client.status(running.id).state == "cancelled", timeout=60, what="the slow job's cancel")
    client.delete(running.id)  # a retry of it would keep a CPU busy for the rest of the file
    files = sorted(p.relative_to(engine.job_root / completed.id / "out").as_posix()
                   for p in (engine.job_root / completed.id / "out").rglob("*") if p.is_file())
    assert "manifest.json" in files
    return {"completed": completed.id, "cancelled": cancelled.id, "files": files}


def test_the_served_document_is_the_committed_one(document):
    assert document == _DOCUMENT, "the served /v1/openapi.json differs from engine/service/openapi.json"
    served = {(m.upper(), p) for p, item in document["paths"].items() for m in item}
    assert served == set(OPERATIONS) and len(OPERATIONS) == 10


# Path parameters go out percent-encoded, as schemathesis sends its own ("/" as %2F), and never as "." or "..":
# the client removes those segments from the URL (RFC 3986), so the request would go to another route. The
# server sees traversal in the encoded forms below (tests/test_service_api.py sends the raw ones).
def _encoded(text: str) -> str:
    return quote(text, safe="")


HOSTILE_FILE_PATHS = ["%2e%2e/log.txt", "..%2flog.txt", "%2e%2e%2f%2e%2e%2fstatus.json", "..\\log.txt", "/etc/passwd",
                      "C:/x", "manifest.json/", "frames//x", "nul%00.png", "%2fetc%2fpasswd"]
_made_up_ids = (st.text(max_size=16) | st.sampled_from(["a/cancel", "x/files/y", "a/log", "a/", "/", "j/retry"])).map(
    _encoded).filter(lambda t: t not in ("", ".", ".."))


def _aim(case, data, jobs) -> None:
    """Point a generated case at a real job (and bundle file) most of the time; made-up ids stay possible."""
    params = case.path_parameters or {}
    if "job_id" not in params:
        return
    target = data.draw(st.sampled_from(["completed", "cancelled", "unknown", "made-up", "generated"]), label="target")
    if target == "made-up":
        params = {**params, "job_id": data.draw(_made_up_ids, label="job_id")}
    elif target != "generated":
        params = {**params, "job_id": jobs.get(target, UNKNOWN_JOB)}
        if "file_path" in params and target == "completed":
            params["file_path"] = data.draw(st.sampled_from(jobs["files"] + HOSTILE_FILE_PATHS) | st.just(params["file_path"]),
                                            label="file_path")
    case.path_parameters = params


def _sweep(operation, jobs) -> list[dict]:
    """The path parameters every id route is sent once, whatever the fuzz draws: each real job and an unknown
    one, and for the files route every file of the completed job's bundle and each hostile path."""
    if "{job_id}" not in operation.path:
        return []
    if "{file_path}" in operation.path:
        return [{"job_id": jobs["completed"], "file_path": f} for f in jobs["files"] + HOSTILE_FILE_PATHS] + \
               [{"job_id": job, "file_path": "manifest.json"} for job in (jobs["cancelled"], UNKNOWN_JOB)]
    return [{"job_id": job} for job in (jobs["completed"], jobs["cancelled"], UNKNOWN_JOB)]


def _has_negative_space(operation) -> bool:
    """Whether the document constrains anything a request could violate (a body; path ids are any string)."""
    return operation.method.upper() == "POST" and operation.path == "/v1/jobs"


@pytest.mark.slow
@pytest.mark.parametrize("op", OPERATIONS, ids=_cases_label)
def test_every_operation_answers_as_documented(op, engine, auth, schema, session, jobs):
    method, path = op
    operation = schema[path][method]
    calls = {"n": 0}
    for params in _sweep(operation, jobs):
        case = operation.Case(path_parameters=params)
        response = case.call(base_url=engine.url, session=session, headers=dict(auth), timeout=TIMEOUT)
        case.validate_response(response, checks=CHECKS, headers=auth)

    @FUZZ
    @given(data=st.data())
    def with_token(data):
        case = data.draw(operation.as_strategy(GenerationMode.POSITIVE), label="case")
        _aim(case, data, jobs)
        response = case.call(base_url=engine.url, session=session, headers=dict(auth), timeout=TIMEOUT)
        case.validate_response(response, checks=CHECKS, headers=auth)
        calls["n"] += 1

    with_token()

    if _has_negative_space(operation):
        @FUZZ
        @given(case=operation.as_strategy(GenerationMode.NEGATIVE))
        def invalid(case):
            response = case.call(base_url=engine.url, session=session, headers=dict(auth), timeout=TIMEOUT)
            case.validate_response(response, checks=NEGATIVE_CHECKS, headers=auth)
            calls["n"] += 1

        invalid()

    @settings(FUZZ, max_examples=8)
    @given(data=st.data(), token=st.sampled_from([None, "", "Bearer", "Bearer ", "Basic x", "Bearer wrong-token",
                                                  f"Bearer {engine.token}x", f"bearer  {engine.token[:-1]}"]))
    def without_the_token(data, token):
        case = data.draw(operation.as_strategy(GenerationMode.POSITIVE), label="case")
        _aim(case, data, jobs)
        headers = {} if token is None else {"Authorization": token}
        response = case.call(base_url=engine.url, session=session, headers=dict(headers), timeout=TIMEOUT)
        case.validate_response(response, checks=CHECKS, headers=headers)
        if path != "/v1/health":
            assert response.status_code == 401, (token, response.status_code, response.text[:300])
        calls["n"] += 1

    without_the_token()
    # hypothesis ran the examples (an operation without inputs has one request to send)
    assert calls["n"] >= (EXAMPLES if "{" in path or method == "POST" else 2), calls


@pytest.mark.parametrize("path", sorted(_DOCUMENT["paths"]))
def test_undocumented_methods_are_405_allowing_the_documented_ones(path, engine, auth, document, jobs):
    documented = {m.upper() for m in document["paths"][path]}
    target = path.replace("{job_id}", jobs["completed"]).replace("{file_path}", "manifest.json")
    for method in sorted({"DELETE", "GET", "PATCH", "POST", "PUT", "OPTIONS"} - documented):
        for headers in (auth, {}):
            r = requests.request(method, f"{engine.url}{target}", headers=dict(headers), timeout=TIMEOUT)
            assert r.status_code == 405, (method, path, r.status_code)
            assert {m.strip() for m in r.headers["allow"].split(",")} == documented, (method, path, r.headers["allow"])
            assert r.headers["content-type"] == "application/json" and set(r.json()) == {"error", "problems"}


# Generator options as a client might send them: sometimes right, often the wrong type or range.
_option_values = (st.integers(-3, 40) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.none()
                  | st.text(max_size=4) | st.lists(st.integers(), max_size=2))
# Text with anything JSON can carry, lone surrogates included.
_any_text = st.text(st.characters(codec=None, categories=None), min_size=0, max_size=12)


def _strict_json(doc) -> bool:
    try:
        json.dumps(doc, allow_nan=False)
        return True
    except ValueError:
        return False


@pytest.mark.slow
def test_real_submissions_answer_as_documented(engine, auth, schema, session, job_folder):
    """Submissions with a real reference image and depth (uploaded, or local paths) and a valid spec but for
    fuzzed names, prompts, seeds, camera names, options and paths: each is queued (201, a documented job
    status), queue-full (429) or refused (400, 403) as the document says, never a 5xx; and every job queued
    then completes (whatever was accepted was checked, not left to fail later)."""
    operation = schema["/v1/jobs"]["POST"]
    valid = json.loads((job_folder / "job.json").read_text())
    image = (job_folder / "ref.png").read_bytes()
    depth = (job_folder / "ref_depth.npy").read_bytes()
    seen: dict[int, int] = {}
    queued: list[str] = []

    local = st.sampled_from(["ref.png", "ref_depth.npy", "job.json", "missing.png", "../ref.png", "/etc/hostname", ""])
    options = st.dictionaries(st.sampled_from(["segment_length", "depth_sigma", "reference_depth_m", "temporal", "unknown"])
                              | _any_text, _option_values, max_size=3)
    # Each field is left valid or fuzzed, so some submissions are valid and queued.
    changes = st.fixed_dictionaries({}, optional={"name": _any_text, "prompt": _any_text, "seed": st.integers(-1, 2**64),
                                                  "options": options, "camera": _any_text, "image": local, "depth": local})

    @settings(FUZZ, max_examples=40)
    @given(change=changes, as_json=st.booleans())
    def submit(change, as_json):
        doc = json.loads(json.dumps(valid))
        doc.update({k: v for k, v in change.items() if k in ("name", "prompt", "seed", "options")})
        doc["trajectories"][0]["name"] = change.get("camera", doc["trajectories"][0]["name"])
        if as_json and not _strict_json(doc):
            as_json = False  # the HTTP client refuses NaN in a JSON body; the multipart spec text carries it
        if as_json:  # local paths, resolved against base_dir (an allowed folder)
            doc["reference"] = {"image": change.get("image", "ref.png"), "depth": change.get("depth", "ref_depth.npy")}
            case = operation.Case(body=doc, media_type="application/json", query={"base_dir": str(job_folder)})
        else:
            body = {"spec": json.dumps(doc), "image": image, "depth": depth}
            case = operation.Case(body=body, media_type="multipart/form-data")
        response = case.call(base_url=engine.url, session=session, headers=dict(auth), timeout=TIMEOUT)
        case.validate_response(response, checks=CHECKS, headers=auth)
        assert response.status_code in (201, 400, 403, 429), response.text[:300]
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        if response.status_code == 201:
            queued.append(response.json()["id"])

    submit()
    assert seen.get(400) and seen.get(201), seen
    for job_id in queued:
        final = engine.client.wait(job_id, timeout=60, poll_s=0.05)
        assert final.state == "completed", (final.state, final.error, engine.client.log(job_id)[-800:])


def test_the_service_is_healthy_after_the_fuzz(engine, auth, jobs):
    """After everything above (run last in this file): health answers, every job is listed with 200."""
    health = requests.get(f"{engine.url}/v1/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    listing = requests.get(f"{engine.url}/v1/jobs", headers=dict(auth), timeout=TIMEOUT)
    assert listing.status_code == 200
    for job in listing.json()["jobs"]:
        assert requests.get(f"{engine.url}/v1/jobs/{job['id']}", headers=dict(auth), timeout=TIMEOUT).status_code == 200
    engine.check()  # the subprocess is still the one started, alive
