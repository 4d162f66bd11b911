"""The bridge's process manager and client against a real engine: find the Python, start, crash reports, restart, stop."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from keyframe_worlds.bridge.client import EngineClient, EngineError, EngineUnavailable
from keyframe_worlds.bridge.engine_process import EngineCrashed, EngineProcess, resolve_engine_python
from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.engine.testing.service import Engine, write_preview_job


def test_resolve_engine_python(tmp_path, monkeypatch):
    monkeypatch.delenv("KEYFRAME_WORLDS_ENGINE_PYTHON", raising=False)
    venv = Path(sys.executable).parent.parent
    assert resolve_engine_python(venv) == venv / "bin" / "python"
    assert resolve_engine_python(sys.executable) == Path(sys.executable)
    monkeypatch.setenv("KEYFRAME_WORLDS_ENGINE_PYTHON", sys.executable)
    assert resolve_engine_python("") == Path(sys.executable)
    monkeypatch.delenv("KEYFRAME_WORLDS_ENGINE_PYTHON")
    with pytest.raises(KeyframeWorldsError, match="preferences"):
        resolve_engine_python(None)
    with pytest.raises(KeyframeWorldsError, match="not found"):
        resolve_engine_python(tmp_path / "nope" / "python")
    with pytest.raises(KeyframeWorldsError, match="bin/python"):
        resolve_engine_python(tmp_path)
    (tmp_path / "python").write_text("")
    os.chmod(tmp_path / "python", 0o644)
    with pytest.raises(KeyframeWorldsError, match="not executable"):
        resolve_engine_python(tmp_path / "python")


def test_an_engine_that_cannot_start_is_reported_with_its_log(tmp_path):
    engine = EngineProcess(sys.executable, tmp_path / "jobs", extra_args=("--host", "0.0.0.0"), ready_timeout=30)
    with pytest.raises(EngineCrashed) as caught:
        engine.start()
    message = str(caught.value)
    assert "exited with status 2 before it was ready" in message and "--allow-remote" in message
    assert not engine.running()


def test_start_check_restart_stop(tmp_path):
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu")) as engine:
        client = engine.start()
        assert engine.start() is client  # already running: the same client
        assert client.health().devices == ("cpu",)
        first_url, first_token = engine.url, engine.token
        job = client.submit(write_preview_job(tmp_path / "job", frames=4, segment_length=4))
        assert client.wait(job.id, timeout=60, poll_s=0.05).state == "completed"

        # A crash is reported with the engine's last log lines.
        os.kill(engine.process.pid, signal.SIGKILL)
        engine.process.wait(10)
        with pytest.raises(EngineCrashed) as caught:
            engine.check()
        assert "exit status -9" in str(caught.value) and "serving" in str(caught.value)
        with pytest.raises(EngineUnavailable):
            EngineClient(first_url, first_token, timeout=5).health()

        # Restart on request: a fresh token; finished jobs are still there.
        client = engine.restart()
        assert engine.token != first_token
        assert [j.id for j in client.jobs()] == [job.id] and client.status(job.id).state == "completed"
        with pytest.raises(EngineError) as caught:
            EngineClient(engine.url, first_token, timeout=5).jobs()
        assert caught.value.status == 401

        process = engine.process
        assert engine.stop() is not None and process.poll() is not None
        assert not engine.running()


def test_stop_on_interpreter_exit(tmp_path):
    """The manager stops the engine when the process that started it exits normally (Blender quitting)."""
    import subprocess

    code = (
        "from keyframe_worlds.engine.testing.service import Engine\n"
        f"e = Engine({str(tmp_path / 'jobs')!r}, extra_args=('--device', 'cpu'))\n"
        "e.start()\n"
        "print(e.process.pid, flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    # atexit stopped it before the interpreter ended (the parent watchdog would need a poll interval and more).
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "has exited: stopping the engine" not in (tmp_path / "jobs" / "engine.log").read_text()


def test_client_errors_are_the_projects_error_type(tmp_path):
    client = EngineClient("http://127.0.0.1:9", "t" * 32, timeout=2)
    with pytest.raises(EngineUnavailable, match="cannot reach"):
        client.health()
    with pytest.raises(KeyframeWorldsError, match="not a job id"):
        client.status("../x")
    with pytest.raises(KeyframeWorldsError, match="inside a result bundle"):
        client.file("j20260101-00000000", "../status.json")
