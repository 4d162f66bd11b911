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
from ..bridge.jobs import JobState
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
    point_budget: int | None = None  # most points the world memory keeps (None: the engine's default)
    mesh_every: int | None = None  # a depth mesh in the bundle every N frames (None: the spec's default)
    mesh_stride: int | None = None  # a mesh vertex every N pixels (None: the spec's default)
    options: dict = field(default_factory=dict)  # generator settings, checked by the generator
    geometry: dict = field(default_factory=dict)  # the job spec's geometry section (depth_model, flow, ...)


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
    output = {key: int(value) for key, value in (("point_budget", settings.point_budget), ("mesh_every", settings.mesh_every),
                                                  ("mesh_stride", settings.mesh_stride)) if value is not None}
    if output:
        doc["output"] = output
    if settings.geometry:
        doc["geometry"] = dict(settings.geometry)
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


WORLDSTEREO_VARIANTS = ("worldstereo-memory-dmd", "worldstereo-memory", "worldstereo-camera")


def worldstereo_options(model_dir: str | None, variant: str, offload: str = "none", attention: str | None = None) -> dict:
    """The ``worldstereo`` generator's options from a model folder laid out as the README says.

    ``model_dir`` holds one folder per variant (``worldstereo-memory-dmd`` ...) and,
    optionally, the Wan2.1 image-to-video diffusers folder (any sub-folder whose
    name contains ``Wan2.1`` and that has a ``model_index.json``). Without a model
    folder the engine falls back to its environment (``$KEYFRAME_WORLDS_WORLDSTEREO_DIR``).
    ``attention``: the attention backend preference (the engine checks that it can run).
    """
    if variant not in WORLDSTEREO_VARIANTS:
        raise KeyframeWorldsError(f"WorldStereo variant must be one of {', '.join(WORLDSTEREO_VARIANTS)}, got {variant!r}")
    options: dict = {"variant": variant, "offload": offload}
    if attention is not None:  # the preference; absent: the engine's default (native)
        options["attention"] = attention
    if model_dir:
        root = Path(bpy.path.abspath(model_dir))
        if not root.is_dir():
            raise KeyframeWorldsError(f"model folder not found: {root}")
        options["checkpoint"] = str(root / variant)
        wan = sorted(p for p in root.iterdir() if p.is_dir() and "wan2.1" in p.name.lower() and (p / "model_index.json").is_file())
        if wan:
            options["wan_dir"] = str(wan[0])
    return options


def engine_python(configured: str | None = None) -> Path:
    """The engine environment's Python: the preference / flag, else ``$KEYFRAME_WORLDS_ENGINE_PYTHON``;
    outside Blender (the bpy module in the engine's own venv) this interpreter when neither is set."""
    import os
    import sys

    from ..bridge.engine_process import PYTHON_ENV, resolve_engine_python

    if not (configured or os.environ.get(PYTHON_ENV)) and not bpy.app.binary_path:
        return Path(sys.executable)
    return resolve_engine_python(configured)


def start_engine(job_root: str | Path, python: str | None = None, device: str = "auto"):
    """Start an engine service subprocess (``keyframe-worlds serve``) the way the add-on does; returns the process manager.

    ``device``: ``auto`` lets the engine pick (every CUDA GPU, else the CPU).
    """
    from ..bridge.engine_process import EngineProcess

    extra = () if device == "auto" else ("--device", device)
    process = EngineProcess(engine_python(python), job_root, extra_args=extra)
    process.start()
    return process


def run_through_engine(spec_path: str | Path, bundle_dir: str | Path, *, python: str | None = None, device: str = "auto",
                       on_status=None, job_root: str | Path | None = None) -> Path:
    """Start an engine service, submit the job, wait (``on_status(JobStatus)`` at every poll), fetch the bundle, stop the engine.

    For batch use (headless ``generate``, the demo): it blocks. The UI uses the
    same engine and client without waiting (``jobs_ui``).
    """
    bundle_dir = Path(bundle_dir)
    process = start_engine(job_root or bundle_dir.parent / "engine", python, device)
    try:
        client = process.client
        job = client.submit(spec_path)
        status = client.wait(job.id, poll_s=0.25, on_status=on_status)
        if status.state is not JobState.COMPLETED:
            raise KeyframeWorldsError(f"the job {status.state}: {status.error or status.stage}")
        return client.download_bundle(job.id, bundle_dir)
    finally:
        process.stop()
