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
from ..bridge.panorama import PERSPECTIVE
from ..bridge.paths import wan_folder_in
from .choices import DEPTH_SOURCES, REFERENCE_SOURCES
from .reference import check_reference_camera, render_reference
from .scene_cameras import choose_cameras, extract_trajectory, frame_range


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
    projection: str = PERSPECTIVE  # a picked image's reference.projection (a rendered one: the camera's own)
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
    seed_object: str = ""  # a mesh or point-cloud object whose points seed the memory (reference.points); "": none


@dataclass(frozen=True)
class PreparedJob:
    spec_path: Path
    spec: spec.JobSpec
    warnings: tuple[str, ...]


#: The stages of preparing a job on Blender's side, as the panel shows them (the engine's own stages follow).
TRAJECTORY_STAGE = "extracting camera trajectories"
RENDER_STAGE = "rendering the reference"
RENDER_DEPTH_STAGE = "rendering the reference depth"
SPEC_STAGE = "writing the job"


class JobPreparation:
    """``prepare_job`` in stages, so the UI can run one stage per timer tick and show it.

    The constructor checks everything that needs no render (the settings, the chosen cameras and frame range,
    the chosen reference and depth files) and raises at once; :meth:`stages` lists what is left as
    ``(stage word, function)``; :meth:`run` runs them all. Every stage runs on the main thread: Blender's data
    and its renderer may not be used from another thread.
    """

    def __init__(self, scene: bpy.types.Scene, settings: JobSettings, job_dir: str | Path, selected=()):
        if settings.reference not in REFERENCE_SOURCES:
            raise KeyframeWorldsError(f"reference source must be one of {', '.join(REFERENCE_SOURCES)}, got {settings.reference!r}")
        if settings.depth not in DEPTH_SOURCES:
            raise KeyframeWorldsError(f"depth source must be one of {', '.join(DEPTH_SOURCES)}, got {settings.depth!r}")
        if settings.depth == "SCENE" and settings.reference != "RENDER":
            raise KeyframeWorldsError("depth from the scene needs the reference rendered from the scene (a picked image may show something else)")
        for value, name in ((settings.mesh_every, "mesh every"), (settings.mesh_stride, "mesh stride")):
            if value is not None and value < 1:
                raise KeyframeWorldsError(f"{name} must be at least 1, got {value}")
        self.scene, self.settings = scene, settings
        self.out = Path(bpy.path.abspath(str(job_dir)))
        self.made_folder = False  # whether the first stage created ``out``
        frames = frame_range(scene, settings.frame_start, settings.frame_end, settings.frame_step)
        self.shots = choose_cameras(scene, settings.cameras, frames, selected)
        first_camera = self.shots[0][0]
        if settings.reference == "RENDER":
            check_reference_camera(first_camera)
        if settings.seed_object and scene.objects.get(settings.seed_object) is None:
            raise KeyframeWorldsError(f"memory seed: no object named {settings.seed_object!r} in the scene")
        if settings.reference == "FILE":
            _check_chosen(settings.reference_path, "reference", "reference image")
        if settings.depth == "FILE":
            _check_chosen(settings.depth_path, "reference_depth", "reference depth")
        self.warnings: list[str] = []
        self.trajectories: list = []
        self.reference: dict = {}
        self.prepared: PreparedJob | None = None

    def stages(self) -> list[tuple[str, object]]:
        stages = [(TRAJECTORY_STAGE, self._extract)]
        if self.settings.reference == "RENDER":
            stages.append((RENDER_STAGE, self._render_image))
            if self.settings.depth == "SCENE":
                stages.append((RENDER_DEPTH_STAGE, self._render_depth))
        stages.append((SPEC_STAGE, self._write))
        return stages

    def run(self) -> PreparedJob:
        for _stage, function in self.stages():
            function()
        return self.prepared

    def discard(self) -> bool:
        """Remove the job folder this preparation made (a cancelled job sent nothing: its half-made folder is no
        result); a folder that was there before is kept. Returns whether one was removed."""
        if not self.made_folder or not self.out.is_dir():
            return False
        import shutil

        shutil.rmtree(self.out, ignore_errors=True)
        return not self.out.exists()

    def _extract(self) -> None:
        self.made_folder = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self.trajectories = [extract_trajectory(self.scene, cam, frames, self.warnings) for cam, frames in self.shots]
        first = self.trajectories[0]
        self.reference = {"trajectory": first.name, "frame": int(first.frames[0])}

    def _reference_lens(self) -> tuple:
        """The reference frame's intrinsics and lens distortion (None: a pinhole), for ``render_reference``."""
        first = self.trajectories[0]
        return first.intrinsics(0), first.distortion[0]

    def _render_image(self) -> None:
        first = self.trajectories[0]
        ref = render_reference(self.scene, self.scene.objects[first.name], int(first.frames[0]), self.out, with_depth=False,
                               samples=self.settings.samples, lens=self._reference_lens())
        self.reference["image"] = ref.image.name
        if ref.projection != PERSPECTIVE:  # a panoramic reference camera rendered the panorama
            self.reference["projection"] = ref.projection

    def _render_depth(self) -> None:
        first = self.trajectories[0]
        ref = render_reference(self.scene, self.scene.objects[first.name], int(first.frames[0]), self.out, with_image=False,
                               lens=self._reference_lens())
        self.reference["depth"] = ref.depth.name

    def _write(self) -> None:
        settings, out = self.settings, self.out
        reference = dict(self.reference)
        if settings.reference == "FILE":
            reference["image"] = _copy_into(settings.reference_path, out, "reference", "reference image")
            if settings.projection != PERSPECTIVE:
                reference["projection"] = settings.projection
        if settings.depth == "FILE":
            reference["depth"] = _copy_into(settings.depth_path, out, "reference_depth", "reference depth")
        if settings.seed_object:
            from .seed import write_seed_object

            reference["points"] = write_seed_object(self.scene.objects[settings.seed_object],
                                                    bpy.context.evaluated_depsgraph_get(), out)
        doc = {
            "version": spec.JOB_VERSION,
            "name": settings.name,
            "generator": settings.generator,
            "prompt": settings.prompt,
            "seed": settings.seed,
            "reference": reference,
            "trajectories": [t.to_json() for t in self.trajectories],
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
        self.prepared = PreparedJob(path, job.resolve(out), tuple(self.warnings))


def prepare_job(scene: bpy.types.Scene, settings: JobSettings, job_dir: str | Path, selected=()) -> PreparedJob:
    """Write ``job.json`` (validated), the reference image and its depth into ``job_dir`` (every stage at once)."""
    return JobPreparation(scene, settings, job_dir, selected).run()


def _check_chosen(source: str, stem: str, what: str) -> Path:
    """The chosen reference (``stem`` "reference") or depth file, checked by its header; errors name it as given."""
    src = Path(bpy.path.abspath(source)) if source else None
    if src is None or not src.is_file():
        raise KeyframeWorldsError(f"{what} not found: {source or '(none chosen)'}")
    key, suffixes = ("image", spec.IMAGE_SUFFIXES) if stem == "reference" else ("depth", spec.DEPTH_SUFFIXES)
    if not src.name.lower().endswith(suffixes):
        raise KeyframeWorldsError(f"{what} {source}: must be one of {', '.join(suffixes)} files")
    problem = spec.reference_file_problem(key, src)
    if problem:
        raise KeyframeWorldsError(f"{what} {source}: {problem}")
    return src


def _copy_into(source: str, out: Path, stem: str, what: str) -> str:
    """Copy a chosen reference file into the job folder as ``<stem><suffix>``, checked first (:func:`_check_chosen`)."""
    src = _check_chosen(source, stem, what)
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
        if not (root / variant / "config.json").is_file():  # said now, before the reference is rendered
            raise KeyframeWorldsError(f"options.checkpoint: {root / variant} is not a WorldStereo variant folder (no "
                                      f"config.json); the model folder {root} holds one folder per variant")
        options["checkpoint"] = str(root / variant)
        wan = wan_folder_in(root)
        if wan is not None:
            options["wan_dir"] = str(wan)
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
        bundle = client.download_bundle(job.id, bundle_dir)
        # The engine's own copy of a fetched job is a second bundle (hundreds of MB with the 4D outputs):
        # remove it, so each run leaves one bundle, not one more engine job folder.
        client.delete(job.id)
        return bundle
    finally:
        process.stop()
