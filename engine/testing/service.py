"""Helpers shared by the service's tests and ``bench/service.py``: small real jobs and a real server.

Nothing here is mocked: ``write_preview_job`` writes a real reference image
and a valid spec for the ``preview`` generator, and ``Engine`` is a real
``keyframe-worlds serve`` subprocess (through the bridge's process manager),
killed with its whole process group when done.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from ...bridge.engine_process import EngineProcess
from ...bridge.trajectory import Trajectory

TEST_TOKEN_ENV = "KEYFRAME_WORLDS_TOKEN"


def dolly(name: str = "Cam", frames: int = 24, width: int = 64, height: int = 48, step_m: float = 0.02) -> Trajectory:
    """A camera moving sideways and forward, looking down +Z (OpenCV), so memory and holes both occur."""
    c2w = np.tile(np.eye(4), (frames, 1, 1))
    c2w[:, 0, 3] = np.arange(frames) * step_m
    c2w[:, 2, 3] = np.arange(frames) * step_m * 0.5
    f = 0.9 * width
    return Trajectory(name, np.arange(1, frames + 1), c2w, np.full(frames, f), np.full(frames, f),
                      np.full(frames, width / 2), np.full(frames, height / 2), width, height, 24.0)


def write_preview_job(folder: str | os.PathLike, frames: int = 24, segment_length: int = 8, width: int = 64, height: int = 48,
                      name: str = "test", with_depth: bool = True, cameras: int = 1) -> Path:
    """A valid preview job (job.json, ref.png and ref_depth.npy) in ``folder``; returns the spec path."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx ^ yy) & 255], -1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(folder / "ref.png")
    reference = {"image": "ref.png"}
    if with_depth:
        depth = (3.0 + 2.0 * xx / width + np.sin(yy / 5.0)).astype(np.float32)
        np.save(folder / "ref_depth.npy", depth)
        reference["depth"] = "ref_depth.npy"
    trajectories = [dolly(f"Cam{i}" if cameras > 1 else "Cam", frames, width, height, 0.02 * (i + 1)).to_json() for i in range(cameras)]
    doc = {"version": 1, "name": name, "generator": "preview", "seed": 0, "reference": reference,
           "trajectories": trajectories, "output": {"mesh_every": 8, "mesh_stride": 4},
           "options": {"segment_length": segment_length}}
    path = folder / "job.json"
    path.write_text(json.dumps(doc))
    return path


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate()`` until it returns something true (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def tree_digest(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path (hidden checkpoint files included)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Engine(EngineProcess):
    """A real engine for tests: the venv's Python, kill -9 of its process group on ``kill``."""

    def __init__(self, job_root, log_dir=None, extra_args=(), ready_timeout: float = 60.0):
        super().__init__(sys.executable, job_root, log_dir=log_dir, extra_args=tuple(extra_args), ready_timeout=ready_timeout)

    def kill(self) -> None:
        """kill -9 of the engine's process group (it runs in its own session)."""
        process = self.process
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait(10)
        self.process = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        pid = self.process.pid if self.process is not None else None
        try:
            self.stop(timeout=5.0)
        finally:
            if pid is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)  # anything of its group still alive (ffmpeg)
                except (ProcessLookupError, PermissionError):
                    pass
