"""Turn a Blender scene into a job: trajectories, reference image and depth, the job spec on disk.

Plain functions over ``bpy`` data; the Generate operator and the headless
``generate`` command both call ``prepare_job``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from ..bridge import spec
from ..bridge.errors import KeyframeWorldsError
from .choices import DEPTH_SOURCES, REFERENCE_SOURCES
from .reference import render_reference
from .scene_cameras import extract_trajectories



@dataclass(frozen=True)
class JobSettings:
    """Everything the user chose for one job (the panel's properties, or the command's flags)."""

    name: str = "job"
    cameras: str = "SCENE"  # choices.CAMERA_SOURCES; "SELECTED" uses the objects passed to prepare_job
    frame_start: int | None = None  # None: the scene's range
    frame_end: int | None = None
    frame_step: int = 1
    reference: str = "RENDER"  # REFERENCE_SOURCES
    reference_path: str = ""
    depth: str = "SCENE"  # DEPTH_SOURCES
    depth_path: str = ""
    prompt: str = ""
    generator: str = "preview"
    seed: int = 0
    samples: int = 16  # Cycles samples for a rendered reference
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedJob:
    spec_path: Path
    spec: spec.JobSpec
    warnings: tuple[str, ...]


def prepare_job(scene: bpy.types.Scene, settings: JobSettings, job_dir: str | Path, selected=()) -> PreparedJob:
    """Write ``job.json`` (validated), the reference image and its depth into ``job_dir``."""
    if settings.reference not in REFERENCE_SOURCES:
        raise KeyframeWorldsError(f"reference source must be one of {', '.join(REFERENCE_SOURCES)}, got {settings.reference!r}")
    if settings.depth not in DEPTH_SOURCES:
        raise KeyframeWorldsError(f"depth source must be one of {', '.join(DEPTH_SOURCES)}, got {settings.depth!r}")
    if settings.depth == "SCENE" and settings.reference != "RENDER":
        raise KeyframeWorldsError("depth from the scene needs the reference rendered from the scene (a picked image may show something else)")
    out = Path(bpy.path.abspath(str(job_dir)))
    out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    trajectories = extract_trajectories(scene, settings.cameras, start=settings.frame_start, end=settings.frame_end,
                                        step=settings.frame_step, selected=selected, warnings=warnings)
    first = trajectories[0]
    reference: dict = {"trajectory": first.name, "frame": int(first.frames[0])}
    if settings.reference == "RENDER":
        camera = scene.objects[first.name]
        ref = render_reference(scene, camera, int(first.frames[0]), out, with_depth=settings.depth == "SCENE", samples=settings.samples)
        reference["image"] = ref.image.name
        if ref.depth is not None:
            reference["depth"] = ref.depth.name
    else:
        reference["image"] = _copy_into(settings.reference_path, out, "reference", "reference image")
    if settings.depth == "FILE":
        reference["depth"] = _copy_into(settings.depth_path, out, "reference_depth", "reference depth")
    doc = {
        "version": spec.JOB_VERSION,
        "name": settings.name,
        "generator": settings.generator,
        "prompt": settings.prompt,
        "seed": settings.seed,
        "reference": reference,
        "trajectories": [t.to_json() for t in trajectories],
        "options": dict(settings.options),
    }
    job = spec.JobSpec.from_json(doc, base_dir=out)
    path = out / "job.json"
    spec.write_json_atomic(path, doc)
    return PreparedJob(path, job.resolve(out), tuple(warnings))


def _copy_into(source: str, out: Path, stem: str, what: str) -> str:
    src = Path(bpy.path.abspath(source)) if source else None
    if src is None or not src.is_file():
        raise KeyframeWorldsError(f"{what} not found: {source or '(none chosen)'}")
    target = out / f"{stem}{src.suffix.lower()}"
    if src.resolve() != target.resolve():
        shutil.copyfile(src, target)
    return target.name


ENGINE_PYTHON_ENV = "KEYFRAME_WORLDS_ENGINE_PYTHON"


def engine_python(explicit: str | None = None) -> str:
    """The engine's Python: explicit, else ``$KEYFRAME_WORLDS_ENGINE_PYTHON``, else this interpreter."""
    import os
    import sys

    path = explicit or os.environ.get(ENGINE_PYTHON_ENV) or sys.executable
    if not Path(path).is_file():
        raise KeyframeWorldsError(f"engine Python not found: {path} (set it in the preferences or ${ENGINE_PYTHON_ENV})")
    return path


def run_engine_offline(spec_path: str | Path, bundle_dir: str | Path, python: str | None = None, device: str = "auto") -> Path:
    """Run a prepared job in the engine's own Python (``keyframe-worlds run``), its progress bar on this terminal.

    Blocks until the engine exits; for batch use. The UI talks to the engine
    service instead, so that Blender never waits.
    """
    import subprocess
    import sys

    command = [engine_python(python), "-m", "keyframe_worlds.cli", "run", str(spec_path), "--out", str(bundle_dir), "--device", device]
    proc = subprocess.run(command, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
        raise KeyframeWorldsError(f"the engine failed: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return Path(bundle_dir)
