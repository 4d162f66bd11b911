"""Deleting jobs (DELETE /v1/jobs/{id}, EngineClient.delete, ``keyframe-worlds jobs delete``) and the job
root's disk budget (serve --disk-budget-gb), against a real ``serve``: a full budget is left by deleting."""

from __future__ import annotations

import json

import os
import subprocess

import pytest
import requests

from conftest import VENV_BIN
from keyframe_worlds.bridge.client import EngineError
from keyframe_worlds.engine.testing.service import Engine, wait_for, write_preview_job

CLI = str(VENV_BIN / "keyframe-worlds")
TIMEOUT = 60


def test_delete_removes_finished_jobs_and_refuses_running_ones(tmp_path):
    spec = write_preview_job(tmp_path / "job", frames=6, segment_length=2)
    slow = write_preview_job(tmp_path / "slow", frames=400, segment_length=2, name="slow")
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu")) as eng:
        client = eng.start()
        done = client.wait(client.submit(spec).id, timeout=TIMEOUT, poll_s=0.05)
        assert done.state == "completed"
        folder = tmp_path / "jobs" / done.id
        assert folder.is_dir()
        running = client.submit(slow)
        queued = client.submit(spec)
        wait_for(lambda: client.status(running.id).state == "running", timeout=TIMEOUT, what="the slow job to run")
        for job_id in (running.id, queued.id):
            with pytest.raises(EngineError) as caught:
                client.delete(job_id)
            assert caught.value.status == 409 and "cancel it first" in str(caught.value)
        freed = client.delete(done.id)
        assert freed > 0 and not folder.exists()
        assert done.id not in {j.id for j in client.jobs()}
        with pytest.raises(EngineError) as caught:
            client.delete(done.id)
        assert caught.value.status == 404
        r = requests.delete(f"{eng.url}/v1/jobs/{done.id}", timeout=TIMEOUT)
        assert r.status_code == 401
        # cancelled jobs go too, through the command line
        client.cancel(queued.id)
        client.cancel(running.id)
        wait_for(lambda: client.status(running.id).state == "cancelled", timeout=TIMEOUT, what="the cancel")
        env = {**os.environ, "KEYFRAME_WORLDS_TOKEN": eng.token}
        out = subprocess.run([CLI, "jobs", "delete", "--url", eng.url, running.id, queued.id, "j20260101-00000000"],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 1, out.stderr  # the unknown one fails; the others are deleted
        assert out.stdout.count("deleted ") == 2 and "j20260101-00000000" in out.stderr and "Traceback" not in out.stderr
        assert client.jobs() == []
        listed = subprocess.run([CLI, "jobs", "list", "--url", eng.url], capture_output=True, text=True, timeout=60, env=env)
        assert listed.returncode == 0 and listed.stdout == ""
        assert not [p for p in (tmp_path / "jobs").iterdir() if p.name.startswith("j")]
    # a restart lists nothing that was deleted
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu")) as eng:
        assert eng.start().jobs() == []


def test_a_used_disk_budget_stops_jobs_and_is_507_until_finished_jobs_are_deleted(tmp_path):
    """A 400-frame job here takes about 12 MB on disk, more than a 4 MB budget; a 12-frame one about 0.5 MB
    (without the 4D outputs, which would make the sizes depend on them rather than on the budget's mechanics)."""
    big = write_preview_job(tmp_path / "big", frames=400, segment_length=2, name="big")
    small = write_preview_job(tmp_path / "small", frames=12, segment_length=4, name="small")
    for spec in (big, small):
        doc = json.loads(spec.read_text())
        doc["geometry"] = {"flow": "none", "point_maps": False}
        spec.write_text(json.dumps(doc))
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu", "--disk-budget-gb", "0.004")) as eng:
        client = eng.start()
        assert client.health().disk["budget_bytes"] == 4_000_000
        first = client.wait(client.submit(small).id, timeout=TIMEOUT, poll_s=0.05)
        assert first.state == "completed"
        assert 100_000 < client.health().disk["used_bytes"] < 4_000_000
        stopped = client.wait(client.submit(big).id, timeout=TIMEOUT, poll_s=0.05)
        assert stopped.state == "failed", client.log(stopped.id)
        assert "disk budget used" in stopped.error and "retry" in stopped.error, stopped.error
        assert 0 < stopped.frames_done < 400
        with pytest.raises(EngineError) as caught:
            client.submit(small)
        assert caught.value.status == 507 and "disk budget used" in str(caught.value) and "delete" in str(caught.value)
        assert client.health().version and client.status(first.id).state == "completed"
        assert client.delete(stopped.id) > 0
        second = client.wait(client.submit(small).id, timeout=TIMEOUT, poll_s=0.05)  # room again
        assert second.state == "completed"
        assert client.health().disk["used_bytes"] < 4_000_000
