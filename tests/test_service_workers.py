"""Worker processes of a real ``serve``: killed, hung and crashed workers, devices, warm models.

Every test runs a real engine subprocess on loopback with real worker
processes; faults are real signals (SIGKILL from here, a segfault or a hang
inside the worker through ``engine/testing/faults.py``).
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from keyframe_worlds.bridge.jobs import JobState
from keyframe_worlds.engine.io.images import write_png
from keyframe_worlds.engine.testing import faults
from keyframe_worlds.engine.testing.service import Engine, tree_digest, wait_for, write_preview_job
from keyframe_worlds.engine.testing.synthetic import demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast
from keyframe_worlds.engine.testing.tiny_models import write_tiny_variant, write_tiny_wan_folder

TIMEOUT = 90


def worker_of(client, device):
    return next(w for w in client.health().workers if w["device"] == device)


def test_sigkill_of_the_worker_fails_only_its_job_and_the_next_job_runs(tmp_path):
    long_spec = write_preview_job(tmp_path / "long", frames=80, segment_length=4)
    short_spec = write_preview_job(tmp_path / "short", frames=6, segment_length=3)
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu")) as engine:
        client = engine.start()
        pid = wait_for(lambda: worker_of(client, "cpu")["pid"], what="the worker's pid")
        job = client.submit(long_spec)
        queued = client.submit(short_spec)
        wait_for(lambda: client.status(job.id).frames_done >= 8, what="frames of the long job")
        os.kill(pid, signal.SIGKILL)
        failed = client.wait(job.id, timeout=TIMEOUT, poll_s=0.05)
        assert failed.state is JobState.FAILED
        assert "worker process for cpu" in failed.error and "SIGKILL" in failed.error and "retry" in failed.error
        # the server kept serving; the next job ran on a restarted worker
        assert client.health().jobs["failed"] == 1
        done = client.wait(queued.id, timeout=TIMEOUT, poll_s=0.05)
        assert done.state is JobState.COMPLETED
        info = worker_of(client, "cpu")
        assert info["pid"] not in (None, pid) and info["restarts"] == 1
        # retried, the failed job resumes from its checkpoint and ends as an uninterrupted run would
        retried = client.retry(job.id)
        assert retried.state is JobState.PENDING
        final = client.wait(job.id, timeout=TIMEOUT, poll_s=0.05)
        assert final.state is JobState.COMPLETED and final.attempts == 2
        log = client.log(job.id)
        assert "resuming from the checkpoint" in log and int(log.split("resuming from the checkpoint: ")[1].split()[0]) >= 4
        reference = client.submit(long_spec)
        assert client.wait(reference.id, timeout=TIMEOUT, poll_s=0.05).state is JobState.COMPLETED
        root = engine.job_root
        assert tree_digest(root / job.id / "out") == tree_digest(root / reference.id / "out")


def test_a_job_that_ignores_cancel_is_ended_within_five_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.HANG_AT_FRAMES_ENV, "10")  # the worker goes deaf at 10 frames
    hung_spec = write_preview_job(tmp_path / "hung", frames=60, segment_length=4)
    short_spec = write_preview_job(tmp_path / "short", frames=5, segment_length=5)
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu")) as engine:
        client = engine.start()
        job = client.submit(hung_spec)
        wait_for(lambda: client.status(job.id).frames_done >= 10, what="the job to reach its hang")
        time.sleep(0.3)  # it is stuck now: no progress, no cancel check
        started = time.monotonic()
        client.cancel(job.id)
        final = client.wait(job.id, timeout=10, poll_s=0.05)
        took = time.monotonic() - started
        assert final.state is JobState.CANCELLED and took < 5.0, took
        assert "did not stop" in final.error and "ended and restarted" in final.error
        # the restarted worker runs the next job (it stays below the hanging frame count)
        assert client.wait(client.submit(short_spec).id, timeout=TIMEOUT, poll_s=0.05).state is JobState.COMPLETED


def test_a_segfault_in_the_worker_is_named_and_the_server_keeps_serving(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.CRASH_AT_FRAMES_ENV, "6")
    spec = write_preview_job(tmp_path / "crash", frames=20, segment_length=3)
    short_spec = write_preview_job(tmp_path / "short", frames=4, segment_length=4)
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu")) as engine:
        client = engine.start()
        job = client.wait(client.submit(spec).id, timeout=TIMEOUT, poll_s=0.05)
        assert job.state is JobState.FAILED and "SIGSEGV" in job.error, job.error
        assert client.wait(client.submit(short_spec).id, timeout=TIMEOUT, poll_s=0.05).state is JobState.COMPLETED
        assert worker_of(client, "cpu")["restarts"] == 1


W, H = 64, 48


def write_worldstereo_job(folder, checkpoint, wan, name="ws"):
    """A small worldstereo job (tiny models) in ``folder``: 5 frames of a walk through the synthetic scene."""
    folder.mkdir(parents=True, exist_ok=True)
    k = intrinsics_for_fov(W, H, 70.0)
    frames = [{"frame": 1 + i, "c2w_opencv": look_at_c2w_opencv((-0.4 + 0.08 * i, -4.0, 1.6), (0.0, 2.0, 0.8)).tolist(),
               "fx": float(k[0]), "fy": float(k[1]), "cx": float(k[2]), "cy": float(k[3])} for i in range(5)]
    rgb, z = raycast(demo_scene(), torch.tensor(frames[0]["c2w_opencv"], dtype=torch.float64), k, W, H)
    write_png(folder / "ref.png", rgb.numpy())
    np.save(folder / "ref_depth.npy", z.numpy())
    doc = {"version": 1, "name": name, "generator": "worldstereo", "seed": 3,
           "reference": {"image": "ref.png", "depth": "ref_depth.npy", "trajectory": "Walk", "frame": 1},
           "trajectories": [{"name": "Walk", "fps": 24.0, "width": W, "height": H, "frames": frames}],
           "options": {"checkpoint": str(checkpoint), "wan_dir": str(wan), "size": [H, W], "keyframes": 3,
                       "keyframe_stride": 2}}
    (folder / "job.json").write_text(json.dumps(doc))
    return folder / "job.json"


def test_each_worker_builds_on_its_own_device_and_keeps_the_model_warm(tmp_path):
    """Two workers started for cpu:0 and cpu:1: the generator's pipeline reports the device its worker was
    started for (a model built on a default device would say 'cpu'); a second job of the same variant on
    the same worker loads no weights."""
    wan = write_tiny_wan_folder(tmp_path / "wan")
    dmd = write_tiny_variant(tmp_path / "worldstereo-memory-dmd", "worldstereo-memory-dmd", seed=21)
    specs = [write_worldstereo_job(tmp_path / f"job{i}", dmd, wan, name=f"ws{i}") for i in range(3)]
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu:0", "--device", "cpu:1")) as engine:
        client = engine.start()
        assert [w["device"] for w in client.health().workers] == ["cpu:0", "cpu:1"]
        jobs = [client.submit(spec) for spec in specs]
        finals = [client.wait(j.id, timeout=TIMEOUT * 2, poll_s=0.05) for j in jobs]
        assert all(f.state is JobState.COMPLETED for f in finals), [f.error for f in finals]
        assert {f.device for f in finals} == {"cpu:0", "cpu:1"}
        for final in finals:
            assert f"the generator runs on {final.device}" in client.log(final.id)
        workers = {w["device"]: w for w in client.health().workers}
        # three jobs on two workers: one worker ran two of them and loaded the weights once
        assert sorted(w["loads"] for w in workers.values()) == [1, 1]
        twice = [f for f in finals if sum(g.device == f.device for g in finals) == 2]
        second = max(twice, key=lambda f: f.seq)
        assert "model warm: reusing the worldstereo generator" in client.log(second.id)
        assert "loaded the worldstereo generator" not in client.log(second.id)
        assert workers[second.device]["model"] == f"worldstereo on {second.device}"


def test_serve_refuses_a_device_it_cannot_use(tmp_path):
    import subprocess
    import sys

    from keyframe_worlds.bridge.errors import KeyframeWorldsError
    from keyframe_worlds.engine.service.devices import check_devices, usable_gpu_count

    assert check_devices(["cpu:0", "cpu:1"]) == ["cpu:0", "cpu:1"]
    cases = [(["gpu"], "--device gpu: not a device"), (["cpu", "cpu:0"], "named twice"), (["meta"], "cpu, cpu:N, cuda")]
    assert usable_gpu_count() == torch.cuda.device_count()  # the driver's count, without torch, agrees with torch's
    if not torch.cuda.is_available():
        cases.append((["cuda:0"], "no CUDA device"))
    for devices, words in cases:
        with pytest.raises(KeyframeWorldsError, match=words):
            check_devices(devices)
    proc = subprocess.run([sys.executable, "-m", "keyframe_worlds.cli", "serve", "--job-root", str(tmp_path / "j"),
                           "--device", "gpu"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KEYFRAME_WORLDS_TOKEN": "t" * 32})
    assert proc.returncode == 2 and "--device gpu: not a device" in proc.stderr and "Traceback" not in proc.stderr


def test_the_server_never_imports_torch(tmp_path):
    """The HTTP side stays light and off the GPU: torch is loaded by the workers only."""
    import subprocess
    import sys

    code = ("import sys, threading, time\n"
            "from keyframe_worlds.engine.service.server import ServiceConfig, serve\n"
            "from pathlib import Path\n"
            "def check():\n"
            "    time.sleep(4)\n"
            "    print('TORCH', 'torch' in sys.modules, flush=True)\n"
            "    import os; os._exit(0)\n"
            "threading.Thread(target=check, daemon=True).start()\n"
            f"serve(ServiceConfig(job_root=Path({str(tmp_path / 'jobs')!r}), token='t' * 32, devices=('cpu',)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "READY port=" in proc.stdout and "TORCH False" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("kill_after", [2])
def test_run_resume_continues_an_interrupted_offline_run_file_for_file(tmp_path, kill_after):
    import subprocess
    import sys

    spec = write_preview_job(tmp_path / "job", frames=30, segment_length=4, cameras=2)
    command = [sys.executable, "-m", "keyframe_worlds.cli", "run", str(spec), "--quiet"]
    env = {**os.environ, faults.KILL_AFTER_CHECKPOINTS_ENV: str(kill_after)}
    killed = subprocess.run([*command, "--out", str(tmp_path / "resumed")], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "resumed" / ".checkpoint" / "state.json").is_file()
    # without --resume it says what is there and how to continue, and changes nothing
    refused = subprocess.run([*command, "--out", str(tmp_path / "resumed")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr and "8 of 60 frames done" in refused.stderr, refused.stderr
    resumed = subprocess.run([*command, "--out", str(tmp_path / "resumed"), "--resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([*command, "--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=120)
    assert whole.returncode == 0, whole.stderr
    a, b = tree_digest(tmp_path / "resumed"), tree_digest(tmp_path / "whole")
    assert len(a) > 100 and a == b
