"""Shared test fixtures: paths to the repository and ../shared/fixtures, a clean Blender file, trajectory builders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KEYFRAME_WORLDS_SHARED", REPO_ROOT.parent / "shared"))
WORLDSTEREO_FIXTURES = SHARED / "fixtures" / "worldstereo"
VENV_BIN = REPO_ROOT / ".venv" / "bin"


def example_camera_files() -> list[Path]:
    """Every upstream WorldStereo example camera.json under ../shared/fixtures."""
    return sorted((WORLDSTEREO_FIXTURES / "examples").rglob("camera.json"))


@pytest.fixture
def blank_blend():
    """Reset bpy to an empty factory file before and after the test."""
    import bpy

    bpy.ops.wm.read_homefile(app_template="", use_empty=True)
    yield bpy
    bpy.ops.wm.read_homefile(app_template="", use_empty=True)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def make_trajectory(name: str = "Camera", n: int = 5, seed: int = 0, width: int = 64, height: int = 48, fps: float = 24.0):
    """A random but valid trajectory (rigid c2w_opencv, positive focal lengths, increasing frames)."""
    from keyframe_worlds.bridge.trajectory import Trajectory

    rng = np.random.default_rng(seed)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        c2w[i, :3, :3] = random_rotation(rng)
        c2w[i, :3, 3] = rng.uniform(-10, 10, 3)
    frames = np.cumsum(rng.integers(1, 4, n)) + int(rng.integers(-5, 5))
    return Trajectory(
        name=name,
        frames=frames,
        c2w_opencv=c2w,
        fx=rng.uniform(20, 200, n),
        fy=rng.uniform(20, 200, n),
        cx=rng.uniform(0, width, n),
        cy=rng.uniform(0, height, n),
        width=width,
        height=height,
        fps=fps,
    )


def add_camera(bpy, name: str, location=(0.0, 0.0, 0.0), kind: str = "PERSP"):
    """A camera object of type ``kind`` linked to the current scene."""
    data = bpy.data.cameras.new(name)
    data.type = kind
    cam = bpy.data.objects.new(name, data)
    bpy.context.scene.collection.objects.link(cam)
    cam.location = location
    return cam
