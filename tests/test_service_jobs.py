"""Jobs through a real server: concurrent clients, FIFO on one worker, a full queue, cancel, kill -9 and resume, a full disk.

Every job runs the real ``preview`` generator at a tiny size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from keyframe_worlds.bridge.client import EngineError
from keyframe_worlds.bridge.jobs import CANCELLING_STAGE
from keyframe_worlds.bridge.spec import MANIFEST_FILENAME, load_manifest
from keyframe_worlds.engine.testing.service import Engine, tree_digest, wait_for, write_preview_job

TIMEOUT = 60


def assert_complete_files(out: Path) -> None:
    """Every file in a (partial) bundle is whole: PNGs decode, npy arrays load, no temporary file is left."""
    from PIL import Image

    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert leftovers == [], leftovers
    for png in out.rglob("*.png"):
        with Image.open(png) as image:
            image.load()
    for npy in out.rglob("*.npy"):
        assert np.load(npy, allow_pickle=False).dtype == np.float32


def test_concurrent_clients_fifo_on_one_worker(tmp_path):
    spec = write_preview_job(tmp_path / "job", frames=8, segment_length=4)
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu")) as engine:
        engine.start()
        ids, errors = [], []

        def client_thread():
            from keyframe_worlds.bridge.client import EngineClient

            with EngineClient(engine.url, engine.token) as client:
                try:
                    mine = [client.submit(spec).id for _ in range(2)]
                    ids.extend(mine)
                    for job_id in mine:
                        assert client.wait(job_id, timeout=TIMEOUT, poll_s=0.02).state == "completed"
                except Exception as exc:  # reported below, with every thread's failures
                    errors.append(exc)

        threads = [threading.Thread(target=client_thread) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert not errors, errors
        jobs = sorted(engine.client.jobs(), key=lambda j: j.seq)
        assert sorted(j.id for j in jobs) == sorted(ids) and len(jobs) == 8
        # One worker: each job starts after the previous one (in submission order) has finished.
        for earlier, later in zip(jobs, jobs[1:]):
            assert later.started >= earlier.finished - 1e-3, (earlier, later)
        assert all(j.frames_done == 8 and j.progress == 1.0 for j in jobs)


def test_full_queue_is_429_and_cancel_at_any_stage_keeps_finished_segments(tmp_path):
    long_spec = write_preview_job(tmp_path / "long", frames=400, segment_length=4, width=96, height=64)
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu", "--queue-size", "1")) as engine:
        client = engine.client or engine.start()
        running = client.submit(long_spec)
        wait_for(lambda: client.status(running.id).frames_done >= 8, what="two finished segments")
        waiting = client.submit(long_spec)
        assert client.status(waiting.id).state == "pending" and client.status(waiting.id).queue_position == 0
        with pytest.raises(EngineError) as caught:
            client.submit(long_spec)
        assert caught.value.status == 429 and "queue is full" in str(caught.value)

        assert client.cancel(waiting.id).state == "cancelled"  # pending: at once
        reply = client.cancel(running.id)  # running: at its next progress check; until then the reply says so
        assert (reply.state, reply.stage) == ("running", CANCELLING_STAGE)
        final = client.wait(running.id, timeout=TIMEOUT, poll_s=0.02)
        assert final.state == "cancelled" and final.error is None and 8 <= final.frames_done < 400
        out = engine.job_root / running.id / "out"
        assert not (out / MANIFEST_FILENAME).exists()
        frames = sorted((out / "frames" / "Cam").glob("*.png"))
        assert len(frames) >= 8
        assert_complete_files(out)
        assert (out / ".checkpoint" / "state.json").is_file()
        # The queue has room again.
        again = client.submit(write_preview_job(tmp_path / "short", frames=4, segment_length=4))
        assert client.wait(again.id, timeout=TIMEOUT, poll_s=0.02).state == "completed"


def test_kill_9_mid_job_then_restart_resumes_and_equals_an_uninterrupted_run(tmp_path):
    spec = write_preview_job(tmp_path / "job", frames=120, segment_length=6, width=96, height=64, cameras=2)
    root = tmp_path / "jobs"
    with Engine(root, extra_args=("--device", "cpu")) as engine:
        client = engine.start()
        job = client.submit(spec)
        # Kill in the middle: some segments finished, the job not done.
        status = wait_for(lambda: (s := client.status(job.id)).frames_done >= 60 and s, interval=0.005, what="half the frames")
        engine.kill()
        assert status.state == "running" and status.frames_done < 240
        state = json.loads((root / job.id / "out" / ".checkpoint" / "state.json").read_text())
        assert state["done"] >= 54, "a checkpoint after the finished segments"

        client = engine.start()
        listed = {j.id: j for j in client.jobs()}
        assert job.id in listed and listed[job.id].state in ("pending", "running")
        final = client.wait(job.id, timeout=TIMEOUT, poll_s=0.05)
        assert final.state == "completed" and final.attempts == 2, client.log(job.id)
        log = client.log(job.id)
        assert "resumes from its last finished segment" in log and "resuming from the checkpoint" in log, log
        resumed_from = int(log.split("resuming from the checkpoint: ")[1].split()[0])
        assert resumed_from >= state["done"] > 0

        reference = client.submit(spec)
        assert client.wait(reference.id, timeout=TIMEOUT, poll_s=0.05).state == "completed"
        resumed, uninterrupted = tree_digest(root / job.id / "out"), tree_digest(root / reference.id / "out")
        assert len(resumed) > 500 and resumed == uninterrupted
        load_manifest(root / job.id / "out", check_files=True)


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=10)
    return out.returncode == 0


def test_full_disk_fails_the_job_cleanly(tmp_path):
    """The job root on a 320 KiB tmpfs (root), else a documented injected ENOSPC (see engine/testing/faults.py)."""
    spec = write_preview_job(tmp_path / "job", frames=60, segment_length=4)
    root = tmp_path / "small_disk"
    mounted = mount_tmpfs(root, "320k")
    env_before = os.environ.get("KEYFRAME_WORLDS_FAULT_DISK_FULL_AFTER_WRITES")
    if not mounted:
        os.environ["KEYFRAME_WORLDS_FAULT_DISK_FULL_AFTER_WRITES"] = "60"
    try:
        with Engine(root, log_dir=tmp_path / "logs", extra_args=("--device", "cpu")) as engine:
            client = engine.start()
            job = client.submit(spec)
            final = client.wait(job.id, timeout=TIMEOUT, poll_s=0.05)
            assert final.state == "failed"
            assert "disk full" in final.error and str(root) in final.error
            out = root / job.id / "out"
            assert not (out / MANIFEST_FILENAME).exists()
            assert 0 < len(list((out / "frames" / "Cam").glob("*.png"))) < 60
            assert_complete_files(root / job.id)
            json.loads((root / job.id / "status.json").read_text())  # whole, whichever version it holds
            # Submitting with no room left: a clean 507, and the engine keeps serving.
            with pytest.raises(EngineError) as caught:
                for _ in range(50):
                    client.submit(spec)
            assert caught.value.status == 507 and "disk full" in str(caught.value)
            assert client.health().version and client.status(job.id).state == "failed"
            assert not list(root.glob(".incoming-*"))
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=10)
        elif env_before is None:
            os.environ.pop("KEYFRAME_WORLDS_FAULT_DISK_FULL_AFTER_WRITES", None)


def test_engine_exits_when_its_parent_is_killed(tmp_path):
    """A parent (standing in for Blender) starts the engine through the process manager and is killed -9."""
    code = (
        "import sys, time\n"
        "from keyframe_worlds.engine.testing.service import Engine\n"
        f"e = Engine({str(tmp_path / 'jobs')!r}, extra_args=('--device', 'cpu'))\n"
        "e.start()\n"
        "print(e.process.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        engine_pid = int(parent.stdout.readline())
        os.kill(engine_pid, 0)
        parent.kill()
        parent.wait(10)
        killed_at = time.monotonic()

        def gone():
            try:
                os.kill(engine_pid, 0)
            except ProcessLookupError:
                return True
            # A zombie has exited too (its parent is gone, init reaps it).
            try:
                return Path(f"/proc/{engine_pid}/stat").read_text().split(") ")[1].startswith("Z")
            except (OSError, IndexError):
                return True

        wait_for(gone, timeout=10, interval=0.05, what="the engine to exit")
        assert time.monotonic() - killed_at < 5.0
        assert "has exited: stopping the engine" in (tmp_path / "jobs" / "engine.log").read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
        try:
            os.kill(engine_pid, 9)
        except (ProcessLookupError, UnboundLocalError):
            pass
