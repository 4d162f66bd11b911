"""Thousands of generated malformed submissions against a real server: every one answered 4xx, the server unharmed.

Specs are mutated from a valid one (values replaced by arbitrary JSON, keys
dropped or added, numbers broken) and sent over one keep-alive connection;
the bridge validator (the one source of the rules) must agree that each is
invalid, and the server must answer with exactly the validator's field paths.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import requests
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from keyframe_worlds.bridge.spec import validate_job
from keyframe_worlds.engine.testing.service import Engine, write_preview_job

TIMEOUT = 20
FUZZ = settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("service_fuzz")
    with Engine(root / "jobs", extra_args=("--max-body-mb", "1", "--device", "cpu",
                                                  "--allow-path", str(tmp_path_factory.getbasetemp()))) as eng:
        eng.start()
        yield eng


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A valid spec with absolute reference paths (the local-path form), 3 frames."""
    folder = tmp_path_factory.mktemp("fuzz_job")
    doc = json.loads(write_preview_job(folder, frames=3).read_text())
    doc["reference"] = {k: str(folder / v) for k, v in doc["reference"].items()}
    assert validate_job(doc, base_dir="/", check_files=True) == []
    return doc


@pytest.fixture(scope="module")
def session(engine):
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {engine.token}"
    yield s
    s.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def paths_of(doc, prefix=()):
    """Every (path tuple) into a JSON document, the root included."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from paths_of(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from paths_of(value, prefix + (i,))


@st.composite
def malformed_specs(draw, valid):
    doc = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_of(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add-key", "number"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "add-key" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
        else:
            parent[path[-1]] = draw(st.sampled_from([math.nan, math.inf, -1, 0, 10**30, -0.0, 1e-300, True, "1"]))
    return doc


def dumps(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def check_rejected(response, expected_paths=None):
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["problems"], list)
    if expected_paths is not None:
        assert {p["path"] for p in body["problems"]} == expected_paths


def test_thousands_of_malformed_specs_are_answered_4xx(engine, valid, session):
    url = f"{engine.url}/v1/jobs"
    sent = {"n": 0}

    @FUZZ
    @given(data=st.data())
    def as_json(data):
        doc = data.draw(malformed_specs(valid))
        problems = validate_job(doc, base_dir="/", check_files=True)
        assume(problems)
        response = session.post(url, data=dumps(doc), headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
        structural = validate_job(doc, base_dir=None, check_files=False)
        check_rejected(response, {p.path for p in structural} if structural else None)
        sent["n"] += 1

    as_json()

    @settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=st.binary(max_size=300) | json_values.map(dumps), as_multipart=st.booleans())
    def raw_bodies(body, as_multipart):
        if as_multipart:
            response = session.post(url, files={"spec": (None, body), "image": ("ref.png", b"\x89PNG")}, timeout=TIMEOUT)
        else:
            response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
        check_rejected(response)
        sent["n"] += 1

    raw_bodies()

    assert sent["n"] >= 2500
    health = requests.get(f"{engine.url}/v1/health", timeout=TIMEOUT)
    assert health.status_code == 200
    assert session.get(f"{engine.url}/v1/jobs", timeout=TIMEOUT).json()["jobs"] == [], "a malformed spec was queued"


def test_deeply_nested_and_huge_numbers(engine, session):
    url = f"{engine.url}/v1/jobs"
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"version": 1' + b"9" * 5000 + b"}", b'{"version": 1e999}', b"\xff\xfe{}",
                 b'{"a": "\\ud800"}', b"NaN", b""):
        response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
        check_rejected(response)
    assert requests.get(f"{engine.url}/v1/health", timeout=TIMEOUT).status_code == 200
