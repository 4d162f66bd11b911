"""Every GPU busy: a job split by trajectory runs its parts on two workers at once and fuses them into one bundle.

A real `serve` with two worker processes (cpu:0 and cpu:1, as two GPUs would be), a real preview job with two
cameras; the fused bundle is compared file for file with each camera run alone from the same reference.
"""

from __future__ import annotations

import json

import numpy as np

from keyframe_worlds.bridge import ply
from keyframe_worlds.bridge.jobs import JobState
from keyframe_worlds.bridge.spec import load_job, validate_job, validate_manifest
from keyframe_worlds.engine.run.runner import run_job
from keyframe_worlds.engine.testing import faults
from keyframe_worlds.engine.testing.service import Engine, tree_digest, wait_for, write_preview_job

TIMEOUT = 180


def test_a_split_job_runs_its_trajectories_on_two_workers_at_once_and_fuses_them(tmp_path):
    spec_path = write_preview_job(tmp_path / "job", frames=16, segment_length=4, cameras=2)
    doc = json.loads(spec_path.read_text())
    doc["execution"] = {"split_trajectories": True}
    spec_path.write_text(json.dumps(doc))
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu:0", "--device", "cpu:1")) as engine:
        client = engine.start()
        wait_for(lambda: all(w["state"] == "idle" for w in client.health().workers), timeout=TIMEOUT, what="two idle workers")
        job = client.submit(spec_path)
        final = client.wait(job.id, timeout=TIMEOUT, poll_s=0.1)
        assert final.state is JobState.COMPLETED, final.error
        assert final.frames_done == final.frames_total == 32
        folder = engine.job_root / job.id
        parts = json.loads((folder / "parts.json").read_text())
        log = client.log(job.id)
    assert [p["trajectory"] for p in parts] == ["Cam0", "Cam1"] and all(p["state"] == "completed" for p in parts)
    # Two workers, at the same time: each part on its own device and process, and their runs overlap.
    assert {p["device"] for p in parts} == {"cpu:0", "cpu:1"} and len({p["pid"] for p in parts}) == 2
    assert max(p["started"] for p in parts) < min(p["finished"] for p in parts), parts
    assert "split into 2 parts" in log and "fused 2 parts" in log
    assert not any((folder / "parts" / k / "out").exists() for k in ("0", "1"))  # fused: not kept twice

    bundle = folder / "out"
    assert validate_manifest(json.loads((bundle / "manifest.json").read_text()), bundle) == []
    fused = tree_digest(bundle)
    fused_cloud = ply.read_ply(bundle / "points.ply").vertex
    reference_points = 0
    for name in ("Cam0", "Cam1"):
        # The same job with this camera alone, its reference on it (both cameras start at the reference's pose).
        alone_doc = {**doc, "trajectories": [t for t in doc["trajectories"] if t["name"] == name],
                     "reference": {**doc["reference"], "trajectory": name, "frame": 1}}
        alone_doc.pop("execution")
        alone_path = tmp_path / "job" / f"alone_{name}.json"
        alone_path.write_text(json.dumps(alone_doc))
        run_job(load_job(alone_path), tmp_path / f"alone_{name}")
        alone = tree_digest(tmp_path / f"alone_{name}")
        files = {k: v for k, v in alone.items() if name in k}
        assert len(files) > 16 * 5  # frames, depth (npy, exr), 4D outputs, camera, video, meshes
        assert {k: fused[k] for k in files} == files  # frame for frame, byte for byte
        cloud = ply.read_ply(tmp_path / f"alone_{name}" / "points.ply").vertex
        reference_points = int((cloud["frame"] == 0).sum())
    # The fused cloud: the shared reference's points once, then both cameras' points, numbered in the job's order.
    assert int((fused_cloud["frame"] == 0).sum()) == reference_points
    assert fused_cloud["frame"].max() == 32 and np.isin(np.arange(17, 33), fused_cloud["frame"]).any()


def test_the_split_is_opt_in_and_checked_in_the_spec(tmp_path):
    spec_path = write_preview_job(tmp_path / "job", frames=2, segment_length=2, cameras=2)
    doc = json.loads(spec_path.read_text())
    assert load_job(spec_path).execution.split_trajectories is False  # off unless the spec says so
    doc["execution"] = {"split_trajectories": "yes", "trajectories": ["Cam1", "Nope"], "devices": 2}
    problems = {p.path: p.reason for p in validate_job(doc, base_dir=tmp_path / "job")}
    assert "must be true or false" in problems["execution.split_trajectories"]
    assert "no trajectory named 'Nope'" in problems["execution.trajectories"]
    assert "execution.devices" in problems
    doc["execution"] = {"split_trajectories": True, "trajectories": ["Cam1"]}
    spec = load_job_from(doc, tmp_path / "job")
    assert [t.name for t in spec.run_trajectories()] == ["Cam1"] and spec.to_json()["execution"] == doc["execution"]


def load_job_from(doc, folder):
    path = folder / "job.json"
    path.write_text(json.dumps(doc))
    return load_job(path)


def test_a_failed_part_fails_the_job_and_a_retry_runs_only_the_parts_left(tmp_path, monkeypatch):
    """Cam1 crashes its worker (a real SIGSEGV at its 10th frame; Cam0 has only 6): the job fails naming the part.
    Retried on an engine without the fault, Cam0's completed part is not run again, Cam1 resumes from its
    checkpoint, and the fused bundle validates."""
    spec_path = write_preview_job(tmp_path / "job", frames=16, segment_length=4, cameras=2)
    doc = json.loads(spec_path.read_text())
    doc["trajectories"][0]["frames"] = doc["trajectories"][0]["frames"][:6]
    doc["execution"] = {"split_trajectories": True}
    spec_path.write_text(json.dumps(doc))
    monkeypatch.setenv(faults.CRASH_AT_FRAMES_ENV, "10")
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu:0", "--device", "cpu:1")) as engine:
        client = engine.start()
        job = client.submit(spec_path)
        failed = client.wait(job.id, timeout=TIMEOUT, poll_s=0.1)
    assert failed.state is JobState.FAILED and "part 2 (Cam1)" in failed.error and "SIGSEGV" in failed.error, failed.error
    parts = json.loads((tmp_path / "jobs" / job.id / "parts.json").read_text())
    assert [p["state"] for p in parts] == ["completed", "failed"]
    monkeypatch.delenv(faults.CRASH_AT_FRAMES_ENV)
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu")) as engine:
        client = engine.start()
        client.retry(job.id)
        final = client.wait(job.id, timeout=TIMEOUT, poll_s=0.1)
        log = client.log(job.id)
    assert final.state is JobState.COMPLETED, final.error
    assert "(1 completed before)" in log and log.count("part 1/2 (Cam0) running") == 1
    assert "resuming from the checkpoint" in log
    bundle = tmp_path / "jobs" / job.id / "out"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert validate_manifest(manifest, bundle) == []
    assert [len(t["files"]) for t in manifest["trajectories"]] == [6, 16]
