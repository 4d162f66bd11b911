"""Export for farm: one self-contained job folder per shot, plus the Open Job Description template that runs them.

A shot is a marker-bound camera over its frames up to the next bound marker (``MARKERS``), or one camera over the
chosen range (``SELECTED``, ``ALL``, ``SCENE``). Each job folder is what ``prepare_job`` writes for that camera alone
(``job.json``, the rendered reference and its depth, paths relative to the folder); nothing names a model folder,
which the farm machine supplies. The template (``bridge/farm.py``) sits beside the folders, so its ``JobsDir``
defaults to its own folder and the whole export moves as one. The "Export for farm" operator and the headless
``farm`` command both call :func:`export_farm`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import bpy

from ..bridge.errors import KeyframeWorldsError
from ..bridge.farm import openjd_template, safe_folder_name, write_template
from .jobs import JobSettings, prepare_job
from .scene_cameras import choose_cameras, frame_range, marker_shots

TEMPLATE_FILENAME = "template.yaml"


@dataclass(frozen=True)
class Shot:
    """One job of the export: its folder name, its camera and the frames it covers (an arithmetic run)."""

    name: str
    camera: bpy.types.Object
    frames: tuple[int, ...]


@dataclass(frozen=True)
class FarmExport:
    job_dirs: tuple[Path, ...]
    template: Path
    warnings: tuple[str, ...]


def farm_shots(scene: bpy.types.Scene, source: str, *, start: int | None = None, end: int | None = None, step: int = 1,
               selected=()) -> list[Shot]:
    """The shots of ``source`` (``choices.CAMERA_SOURCES``) over ``start..end`` every ``step`` frames.

    ``MARKERS``: one shot per camera-bound marker (``NN_<marker>``, in marker order); otherwise one per camera
    (``<camera>``). Folder names are made safe and unique.
    """
    frames = frame_range(scene, start, end, step)
    if source == "MARKERS":
        found = [(f"{i + 1:02d}_{marker.name}", camera, shot) for i, (marker, camera, shot) in enumerate(marker_shots(scene, frames))]
    else:
        found = [(camera.name, camera, shot) for camera, shot in choose_cameras(scene, source, frames, selected)]
    shots, taken = [], set()
    for name, camera, shot in found:
        name = base = safe_folder_name(name)
        n = 2
        while name.lower() in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name.lower())
        shots.append(Shot(name, camera, tuple(shot)))
    return shots


def export_farm(scene: bpy.types.Scene, settings: JobSettings, out_dir: str | Path, selected=(), *,
                engine_python: str | None = None, output_dir: str | None = None) -> FarmExport:
    """Write one job folder per shot of ``settings.cameras`` into ``out_dir`` and ``template.yaml`` beside them.

    ``settings``: as for ``prepare_job`` (its ``name`` prefixes nothing; each job is named after its shot). Model
    paths in ``settings.options`` / ``geometry`` are refused: the farm machine supplies its own models.
    ``engine_python`` / ``output_dir``: defaults of the template's parameters (None: the submitter gives them).
    """
    for key in ("checkpoint", "wan_dir"):
        if settings.options.get(key):
            raise KeyframeWorldsError(f"a farm job names no model folder (options.{key}): the farm machine supplies it")
    if settings.geometry.get("depth_model"):
        raise KeyframeWorldsError("a farm job names no depth model: the farm machine supplies it (--depth-model, "
                                  "$KEYFRAME_WORLDS_DEPTH_MODEL)")
    out = Path(bpy.path.abspath(str(out_dir))).resolve()
    shots = farm_shots(scene, settings.cameras, start=settings.frame_start, end=settings.frame_end,
                       step=settings.frame_step, selected=selected)
    job_dirs, warnings = [], []
    for shot in shots:
        shot_settings = replace(settings, name=shot.name, cameras="SELECTED", frame_start=shot.frames[0],
                                frame_end=shot.frames[-1])
        prepared = prepare_job(scene, shot_settings, out / shot.name, selected=[shot.camera])
        warnings.extend(f"{shot.name}: {w}" for w in prepared.warnings)
        job_dirs.append(out / shot.name)
    if not job_dirs:
        raise KeyframeWorldsError("no shot to export")
    template = openjd_template(job_dirs, out, name=f"Keyframe Worlds: {Path(bpy.data.filepath).stem or out.name}",
                               engine_python=engine_python, output_dir=output_dir)
    path = write_template(template, out / TEMPLATE_FILENAME)
    return FarmExport(tuple(job_dirs), path, tuple(warnings))
