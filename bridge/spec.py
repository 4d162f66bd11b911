"""Job spec v1 and result manifest v1: the documents the add-on and the engine exchange.

One source of truth for both: the dataclasses, their JSON form (on disk and on
the wire), and the validators. ``validate_job`` and ``validate_manifest``
never raise on any input; they return every problem, each naming the exact
field path and the reason. ``JobSpec.from_json`` / ``ResultManifest.from_json``
raise ``ValidationError`` carrying that list.

Job spec v1::

    {"version": 1,
     "name": "shot010",                      # job name; the add-on's collection is named after it
     "generator": "preview",                 # one of GENERATORS
     "prompt": "", "seed": 0,
     "reference": {"image": "ref.png",       # RGB reference image (path; relative to the spec file)
                   "depth": "ref_depth.npy",  # optional z-depth in metres (.npy float32 HxW or .exr)
                   "trajectory": "Camera", "frame": 1,  # which camera/frame it shows (default: first)
                   "projection": "perspective",  # or "equirectangular": a 2:1 panorama around that camera (panorama.py)
                   "views": "pano_bank",      # optional: a trajectory file/folder whose frames' images are more views
                   "points": "scan.ply"},      # optional seed of the memory: a PLY file or a COLMAP model folder,
                                               # in the trajectories' world frame (``MAX_SEED_*`` limits)
     "trajectories": [<trajectory JSON, see trajectory.py>, ...],
     "output": {"mesh_every": 8, "mesh_stride": 4, "point_budget": 2000000},
     "options": {...},                       # generator-specific settings, checked by the generator
     "execution": {"split_trajectories": false}}  # optional; see ExecutionOptions

Result manifest v1: see ``ResultManifest``; every path in it is relative to
the bundle folder and must stay inside it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from .atomic import atomic_write
from .errors import KeyframeWorldsError, Problem, ValidationError
from .imageinfo import file_kind, image_info, npy_info
from .panorama import EQUIRECTANGULAR, PERSPECTIVE, PROJECTIONS, is_equirectangular_size
from .trajectory import (
    MAX_SIZE_PX,
    MIN_SIZE_PX,
    Trajectory,
    check_integer,
    check_object,
    check_string,
    check_unknown_keys,
    is_integer,
    text_problems,
    type_name,
    validate_trajectory_json,
)

JOB_VERSION = 1
MANIFEST_VERSION = 1
#: The version-1 name of ``output.mesh_every`` (it also decided retrieval, which is now the runner's own cadence).
OLD_MESH_EVERY_KEY = "keyframe_every"
GENERATORS = ("preview", "worldstereo")
MAX_TRAJECTORIES = 256
MAX_TOTAL_FRAMES = 200_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".exr", ".tif", ".tiff", ".webp")
DEPTH_SUFFIXES = (".npy", ".exr")
#: ``reference.points``: a PLY file, or a COLMAP model folder (its ``points3D``), of at most this many points and bytes.
SEED_POINTS_SUFFIX = ".ply"
MAX_SEED_POINTS = 20_000_000
MAX_SEED_BYTES = 2 * 1024**3


# --- job spec ------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """The reference view: an image, optionally its depth in metres, and which camera frame shows it.

    projection: ``perspective`` (the camera's pinhole view; depth is z-depth) or ``equirectangular`` (a 2:1
    panorama centred on that camera, ``bridge/panorama.py``; depth is the distance along each pixel's ray).
    views: a trajectory file or folder (any read format, e.g. upstream's ``pano_bank``) whose frames' images are
    further reference views, each lifted into the first memory with its own camera.
    """

    image: str
    depth: str | None = None
    trajectory: str | None = None  # None: the first trajectory
    frame: int | None = None  # None: that trajectory's first frame
    projection: str = PERSPECTIVE
    views: str | None = None
    points: str | None = None  # a PLY file or COLMAP model folder seeding the memory (world frame), or None

    def to_json(self) -> dict:
        doc: dict[str, Any] = {"image": self.image}
        for key in ("depth", "trajectory", "frame", "views", "points"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        if self.projection != PERSPECTIVE:
            doc["projection"] = self.projection
        return doc


@dataclass(frozen=True)
class OutputOptions:
    """What the result bundle holds besides frames, depth and cameras (nothing here changes what is generated).

    ``keyframe_every`` is the name version-1 files before ``mesh_every`` used for it; it is still read.
    """

    mesh_every: int = 8  # a depth-textured mesh every N frames of each trajectory
    mesh_stride: int = 4  # mesh vertex every N pixels
    point_budget: int = 2_000_000  # fused point cloud size cap (voxel-downsampled beyond it)

    def to_json(self) -> dict:
        return {"mesh_every": self.mesh_every, "mesh_stride": self.mesh_stride, "point_budget": self.point_budget}

    @classmethod
    def from_json(cls, doc: dict) -> "OutputOptions":
        values = dict(doc)
        if OLD_MESH_EVERY_KEY in values:
            values["mesh_every"] = values.pop(OLD_MESH_EVERY_KEY)
        return cls(**values)


#: How observed optical flow between consecutive frames is estimated (``none``: no flow, scene flow or dynamic mask).
FLOW_METHODS = ("dis", "raft", "none")
GEOMETRY_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


@dataclass(frozen=True)
class GeometryOptions:
    """How the engine gets geometry for the reference and every generated frame, and which 4D outputs it writes.

    depth_model: a local Hugging Face folder of a transformers depth model (None: no learned depth; the memory's
    own completion); relative to the job folder, or absolute. device: where that model runs (``auto``: the job's
    device). flow: observed optical flow method. point_maps: write per-frame world XYZ maps.
    """

    depth_model: str | None = None
    device: str = "auto"
    flow: str = "dis"
    point_maps: bool = True

    def to_json(self) -> dict:
        return {"depth_model": self.depth_model, "device": self.device, "flow": self.flow, "point_maps": self.point_maps}


def _validate_geometry(geometry: Any, base_dir: Path | None, check_files: bool) -> list[Problem]:
    problems: list[Problem] = []
    if not check_object(problems, "geometry", geometry):
        return problems
    check_unknown_keys(problems, "geometry", geometry, set(GeometryOptions.__dataclass_fields__))
    model = geometry.get("depth_model")
    if model is not None and check_string(problems, "geometry.depth_model", model):
        if not model.strip():
            problems.append(Problem("geometry.depth_model", "must name a folder (or be null for no learned depth)"))
        elif check_files:
            folder = Path(model) if base_dir is None or Path(model).is_absolute() else base_dir / model
            if not folder.is_dir():
                problems.append(Problem("geometry.depth_model", f"folder not found: {folder}"))
    device = geometry.get("device", "auto")
    if check_string(problems, "geometry.device", device) and not GEOMETRY_DEVICE_PATTERN.match(device):
        problems.append(Problem("geometry.device", f"must be auto, cpu, cuda or cuda:N, got {device!r}"))
    flow = geometry.get("flow", "dis")
    if flow not in FLOW_METHODS:
        problems.append(Problem("geometry.flow", f"must be one of {', '.join(FLOW_METHODS)}, got {flow!r}"))
    if not isinstance(geometry.get("point_maps", True), bool):
        problems.append(Problem("geometry.point_maps", "must be true or false"))
    return problems


@dataclass(frozen=True)
class ExecutionOptions:
    """How the engine schedules a job's trajectories (never what one trajectory's frames are made from).

    split_trajectories: opt-in. The engine service may run each trajectory as its own part on any free device, all
    from the memory the reference alone gives, and fuse the parts' bundles into one. What it gives up: a trajectory
    no longer sees what earlier trajectories generated (the default runs them in order, each fusing into the memory
    the next one renders and retrieves from), so two cameras agree only through the reference's shared memory.
    trajectories: run only these trajectories (by name, in the spec's order) from the reference's memory; None: all.
    (The service's parts are this job with one trajectory named.)
    """

    split_trajectories: bool = False
    trajectories: tuple[str, ...] | None = None

    def to_json(self) -> dict:
        doc: dict[str, Any] = {"split_trajectories": self.split_trajectories}
        if self.trajectories is not None:
            doc["trajectories"] = list(self.trajectories)
        return doc


def _validate_execution(execution: Any, names: list[str]) -> list[Problem]:
    problems: list[Problem] = []
    if not check_object(problems, "execution", execution):
        return problems
    check_unknown_keys(problems, "execution", execution, set(ExecutionOptions.__dataclass_fields__))
    if not isinstance(execution.get("split_trajectories", False), bool):
        problems.append(Problem("execution.split_trajectories", "must be true or false (true: the service may run each "
                                "trajectory on its own device from the reference's memory, and fuse them)"))
    chosen = execution.get("trajectories")
    if chosen is not None:
        if not isinstance(chosen, list) or not chosen or not all(isinstance(n, str) for n in chosen):
            problems.append(Problem("execution.trajectories", "must be a non-empty list of trajectory names (or null: all)"))
        else:
            unknown = [n for n in chosen if names and n not in names]
            if unknown:
                problems.append(Problem("execution.trajectories", f"no trajectory named {', '.join(map(repr, unknown))} "
                                        f"(have: {', '.join(names)})"))
            if len(set(chosen)) != len(chosen):
                problems.append(Problem("execution.trajectories", "names a trajectory twice"))
    return problems


@dataclass(frozen=True)
class JobSpec:
    """A validated job. Paths are kept as written; ``resolve`` makes them absolute against a folder."""

    name: str
    generator: str
    trajectories: tuple[Trajectory, ...]
    reference: Reference
    prompt: str = ""
    seed: int = 0
    output: OutputOptions = field(default_factory=OutputOptions)
    options: dict = field(default_factory=dict)
    version: int = JOB_VERSION
    geometry: GeometryOptions = field(default_factory=GeometryOptions)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)

    def to_json(self) -> dict:
        doc = {
            "version": self.version,
            "name": self.name,
            "generator": self.generator,
            "prompt": self.prompt,
            "seed": self.seed,
            "reference": self.reference.to_json(),
            "trajectories": [t.to_json() for t in self.trajectories],
            "output": self.output.to_json(),
            "geometry": self.geometry.to_json(),
            "options": dict(self.options),
        }
        if self.execution != ExecutionOptions():  # written only when set, so every other spec's JSON stays as it was
            doc["execution"] = self.execution.to_json()
        return doc

    def run_trajectories(self) -> tuple[Trajectory, ...]:
        """The trajectories this run generates (``execution.trajectories``, else all), in the spec's order."""
        chosen = self.execution.trajectories
        return self.trajectories if chosen is None else tuple(t for t in self.trajectories if t.name in chosen)

    @classmethod
    def from_json(cls, doc: Any, base_dir: str | os.PathLike | None = None, check_files: bool = True) -> "JobSpec":
        """Validate and build. With ``base_dir`` and ``check_files``, referenced files must exist."""
        problems = validate_job(doc, base_dir=base_dir, check_files=check_files)
        if problems:
            raise ValidationError("job spec", problems)
        ref = doc["reference"]
        out = doc.get("output", {})
        return cls(
            name=doc["name"],
            generator=doc["generator"],
            trajectories=tuple(Trajectory.from_json(t, f"trajectories[{i}]") for i, t in enumerate(doc["trajectories"])),
            reference=Reference(ref["image"], ref.get("depth"), ref.get("trajectory"), ref.get("frame"),
                                ref.get("projection", PERSPECTIVE), ref.get("views"), ref.get("points")),
            prompt=doc.get("prompt", ""),
            seed=doc.get("seed", 0),
            output=OutputOptions.from_json(out),
            options=dict(doc.get("options", {})),
            version=doc["version"],
            geometry=GeometryOptions(**doc.get("geometry", {})),
            execution=ExecutionOptions(bool(doc.get("execution", {}).get("split_trajectories", False)),
                                       None if doc.get("execution", {}).get("trajectories") is None
                                       else tuple(doc["execution"]["trajectories"])),
        )

    def resolve(self, base_dir: str | os.PathLike) -> "JobSpec":
        """The same job with the reference paths made absolute against ``base_dir``."""
        base = Path(base_dir)
        ref = self.reference
        image = str((base / ref.image).resolve())
        depth = str((base / ref.depth).resolve()) if ref.depth else None
        views = str((base / ref.views).resolve()) if ref.views else None
        points = str((base / ref.points).resolve()) if ref.points else None
        geometry = self.geometry
        if geometry.depth_model:
            geometry = replace(geometry, depth_model=str((base / geometry.depth_model).resolve()))
        return JobSpec(**{**self.__dict__, "reference": replace(ref, image=image, depth=depth, views=views, points=points),
                          "geometry": geometry})

    def reference_view(self) -> tuple[Trajectory, int]:
        """The trajectory and frame index the reference image shows."""
        traj = self.trajectories[0]
        if self.reference.trajectory is not None:
            traj = next(t for t in self.trajectories if t.name == self.reference.trajectory)
        index = 0
        if self.reference.frame is not None:
            index = int(list(traj.frames).index(self.reference.frame))
        return traj, index


def validate_job(doc: Any, base_dir: str | os.PathLike | None = None, check_files: bool = True) -> list[Problem]:
    """Every problem of a job spec document; never raises.

    ``base_dir`` is the folder relative paths are resolved against (the spec
    file's folder); with ``check_files`` the reference files must exist there.
    """
    try:
        return _validate_job(doc, base_dir, check_files)
    except Exception as exc:  # a validator bug must not take a server down; report it as a problem
        return [Problem("", f"could not be validated: {type(exc).__name__}: {exc}")]


def _validate_job(doc: Any, base_dir, check_files: bool) -> list[Problem]:
    problems: list[Problem] = []
    if not check_object(problems, "", doc):
        return [Problem("(document)", problems[0].reason)]
    # Text that is not UTF-8 is refused before anything else, so no later message repeats it.
    bad_text = text_problems(doc)
    if bad_text:
        return bad_text
    check_unknown_keys(problems, "", doc, {"version", "name", "generator", "prompt", "seed", "reference", "trajectories", "output",
                                           "geometry", "execution", "options"})
    problems = [Problem(p.path.lstrip("."), p.reason) for p in problems]
    version = doc.get("version")
    if "version" not in doc:
        problems.append(Problem("version", f"is required (this engine reads job spec version {JOB_VERSION})"))
    elif not is_integer(version) or version != JOB_VERSION:
        problems.append(Problem("version", f"unsupported job spec version {version!r}; this engine reads version {JOB_VERSION}"))
    check_string(problems, "name", doc.get("name"))
    if isinstance(doc.get("name"), str) and len(doc["name"]) > 200:
        problems.append(Problem("name", "must be at most 200 characters"))
    generator = doc.get("generator")
    if check_string(problems, "generator", generator) and generator not in GENERATORS:
        problems.append(Problem("generator", f"unknown generator {generator!r}; available: {', '.join(GENERATORS)}"))
    if "prompt" in doc:
        check_string(problems, "prompt", doc["prompt"], non_empty=False)
    if "seed" in doc:
        check_integer(problems, "seed", doc["seed"], minimum=0, maximum=2**63 - 1)

    names: list[str] = []
    trajectories = doc.get("trajectories")
    if not isinstance(trajectories, list):
        problems.append(Problem("trajectories", f"must be a list of trajectories, got {type_name(trajectories)}"))
    elif not trajectories:
        problems.append(Problem("trajectories", "is empty: a job needs at least one camera trajectory"))
    elif len(trajectories) > MAX_TRAJECTORIES:
        problems.append(Problem("trajectories", f"has {len(trajectories)} trajectories, more than the limit of {MAX_TRAJECTORIES}"))
    else:
        total = 0
        for i, traj in enumerate(trajectories):
            traj_problems = validate_trajectory_json(traj, f"trajectories[{i}]")
            problems.extend(traj_problems)
            if isinstance(traj, dict):
                if isinstance(traj.get("name"), str):
                    if traj["name"] in names:
                        problems.append(Problem(f"trajectories[{i}].name", f"duplicate camera name {traj['name']!r}"))
                    names.append(traj["name"])
                if isinstance(traj.get("frames"), list):
                    total += len(traj["frames"])
        if total > MAX_TOTAL_FRAMES:
            problems.append(Problem("trajectories", f"{total} frames in all, more than the limit of {MAX_TOTAL_FRAMES}"))

    problems.extend(_validate_reference(doc.get("reference"), doc, names, base_dir, check_files))

    if "output" in doc:
        out = doc["output"]
        if check_object(problems, "output", out):
            check_unknown_keys(problems, "output", out, {"mesh_every", OLD_MESH_EVERY_KEY, "mesh_stride", "point_budget"})
            for key in ("mesh_every", OLD_MESH_EVERY_KEY):
                if key in out:
                    check_integer(problems, f"output.{key}", out[key], minimum=1, maximum=100_000)
            if "mesh_every" in out and OLD_MESH_EVERY_KEY in out:
                problems.append(Problem(f"output.{OLD_MESH_EVERY_KEY}", "is the old name of output.mesh_every: give one of them"))
            if "mesh_stride" in out:
                check_integer(problems, "output.mesh_stride", out["mesh_stride"], minimum=1, maximum=256)
            if "point_budget" in out:
                check_integer(problems, "output.point_budget", out["point_budget"], minimum=1000, maximum=200_000_000)
    if "geometry" in doc:
        problems.extend(_validate_geometry(doc["geometry"], Path(base_dir) if base_dir is not None else None, check_files))
    if "execution" in doc:
        problems.extend(_validate_execution(doc["execution"], names))
    if "options" in doc:
        check_object(problems, "options", doc["options"])
    return problems


def seed_points_problems(value: Any, base_dir, check_files: bool) -> list[Problem]:
    """What is wrong with ``reference.points``: a ``.ply`` file or a COLMAP model folder (with ``points3D``), by header only.

    The PLY's declared vertex count and every file's size are held to ``MAX_SEED_POINTS`` / ``MAX_SEED_BYTES`` before
    anything is decoded (``bridge/seed.py`` reads them).
    """
    from . import colmap
    from .ply import ply_vertex_count

    problems: list[Problem] = []
    where = "reference.points"
    if not check_string(problems, where, value):
        return problems
    if not check_files or base_dir is None:
        return problems
    full = Path(value) if Path(value).is_absolute() else Path(base_dir) / value
    if full.is_dir():
        kind = colmap.model_kind(full)
        points = full / ("points3D.bin" if kind == "binary" else "points3D.txt")
        if kind is None or not points.is_file():
            return [Problem(where, f"{full} is a folder without a COLMAP model's points3D (points3D.txt or points3D.bin, "
                                   "beside cameras and images)")]
        files = [points]
        if kind == "binary":  # its first uint64 is the point count
            with open(points, "rb") as fh:
                head = fh.read(8)
            count = int.from_bytes(head, "little") if len(head) == 8 else 0
            if count > MAX_SEED_POINTS:
                return [Problem(where, f"{points} has {count} points, more than the limit of {MAX_SEED_POINTS}")]
    elif full.is_file():
        if full.suffix.lower() != SEED_POINTS_SUFFIX:
            return [Problem(where, f"must be a {SEED_POINTS_SUFFIX} file or a COLMAP model folder, got {value!r}")]
        try:
            ply_vertex_count(full, MAX_SEED_POINTS)
        except KeyframeWorldsError as exc:
            return [Problem(where, str(exc))]
        files = [full]
    else:
        return [Problem(where, f"not found: {full}")]
    for path in files:
        if path.stat().st_size > MAX_SEED_BYTES:
            problems.append(Problem(where, f"{path} is {path.stat().st_size} bytes, more than the limit of {MAX_SEED_BYTES}"))
    return problems


def _validate_reference(ref: Any, doc: dict, names: list[str], base_dir, check_files: bool) -> list[Problem]:
    problems: list[Problem] = []
    if ref is None:
        return [Problem("reference", "is required: a reference image (and optionally its depth)")]
    if not check_object(problems, "reference", ref):
        return problems
    check_unknown_keys(problems, "reference", ref, {"image", "depth", "trajectory", "frame", "projection", "views", "points"})
    if ref.get("points") is not None:
        problems.extend(seed_points_problems(ref["points"], base_dir, check_files))
    for key, suffixes, required in (("image", IMAGE_SUFFIXES, True), ("depth", DEPTH_SUFFIXES, False)):
        value = ref.get(key)
        if value is None:
            if required:
                problems.append(Problem(f"reference.{key}", "is required: the path of the reference image"))
            continue
        if not check_string(problems, f"reference.{key}", value):
            continue
        if not value.lower().endswith(suffixes):
            problems.append(Problem(f"reference.{key}", f"must be one of {', '.join(suffixes)} files, got {value!r}"))
        elif check_files and base_dir is not None:
            full = Path(base_dir) / value
            if not full.is_file():
                problems.append(Problem(f"reference.{key}", f"file not found: {full}"))
            else:
                problem = reference_file_problem(key, full)
                if problem:
                    problems.append(Problem(f"reference.{key}", problem))
    traj_name = ref.get("trajectory")
    target = None
    if traj_name is not None:
        if check_string(problems, "reference.trajectory", traj_name):
            if names and traj_name not in names:
                problems.append(Problem("reference.trajectory", f"no trajectory named {traj_name!r} (have: {', '.join(names)})"))
            elif names:
                target = doc["trajectories"][names.index(traj_name)]
    elif isinstance(doc.get("trajectories"), list) and doc["trajectories"]:
        target = doc["trajectories"][0]
    if "frame" in ref:
        if check_integer(problems, "reference.frame", ref["frame"]) and isinstance(target, dict) and isinstance(target.get("frames"), list):
            numbers = [f.get("frame") for f in target["frames"] if isinstance(f, dict)]
            if ref["frame"] not in numbers:
                problems.append(Problem("reference.frame", f"frame {ref['frame']} is not in trajectory {target.get('name')!r}"))
    problems.extend(_projection_problems(ref, target, base_dir, check_files, bool(problems)))
    return problems


def _projection_problems(ref: dict, target: Any, base_dir, check_files: bool, image_bad: bool) -> list[Problem]:
    """``reference.projection`` and ``reference.views``; a panorama must be 2:1, and a 2:1 image given as a
    perspective reference for a camera of another shape is refused (resizing it would squash it silently)."""
    problems: list[Problem] = []
    projection = ref.get("projection", PERSPECTIVE)
    if projection not in PROJECTIONS:
        problems.append(Problem("reference.projection", f"must be one of {', '.join(PROJECTIONS)}, got {projection!r}"))
        return problems
    views = ref.get("views")
    if views is not None and check_string(problems, "reference.views", views) and check_files and base_dir is not None:
        problem = views_problem(Path(base_dir) / views)
        if problem:
            problems.append(Problem("reference.views", problem))
    image = ref.get("image")
    if image_bad or not isinstance(image, str) or not check_files or base_dir is None:
        return problems
    info = image_info(Path(base_dir) / image)
    if info is None:  # a kind whose header gives no size here (EXR): the engine checks it when it reads the pixels
        return problems
    problem = projection_problem(projection, info[1], info[2], target, str(Path(base_dir) / image))
    if problem:
        problems.append(Problem("reference.projection", problem))
    return problems


def view_images(path: str | os.PathLike) -> list[tuple[Trajectory, int, Path]]:
    """The views of a ``reference.views`` trajectory file or folder: (camera, frame index, image path) for every frame
    with an image, the path as the file names it, from the folder that holds the file (or the folder itself).
    Raises ``KeyframeWorldsError`` for a file that does not read as a trajectory format."""
    from .formats import read_trajectory_set  # formats reads its JSON with this module's read_json

    path = Path(path)
    base = path if path.is_dir() else path.parent
    return [(t, i, base / image) for t in read_trajectory_set(path).trajectories for i, image in enumerate(t.images)
            if image is not None]


def views_problem(path: Path) -> str | None:
    """What is wrong with a ``reference.views`` trajectory file or folder (read, images checked by header), or None."""
    if not path.exists():
        return f"trajectory file or folder not found: {path}"
    try:
        images = view_images(path)
    except KeyframeWorldsError as exc:
        return str(exc)
    if not images:
        return f"{path} has no frame with an image"
    for traj, i, full in images:
        if not full.suffix.lower() in IMAGE_SUFFIXES:
            problem = f"{full} must be one of {', '.join(IMAGE_SUFFIXES)} files"
        else:
            problem = reference_file_problem("image", full) if full.is_file() else f"image not found: {full}"
        if problem:
            return f"camera {traj.name!r} frame {int(traj.frames[i])}: {problem}"
    return None


def projection_problem(projection: str, width: int, height: int, camera: Any, image: str) -> str | None:
    """What is wrong with a reference image of ``width`` x ``height`` px for ``projection``, or None.

    camera: the reference trajectory (JSON dict or ``Trajectory``) or None. Shared by the spec's validation and
    the engine's reading of the pixels (``engine/run/runner.py``), so both say the same.
    """
    if projection == EQUIRECTANGULAR:
        if not is_equirectangular_size(width, height):
            return (f"reference.image {image} is {width}x{height} px; an equirectangular panorama is 2:1 "
                    f"(width = 2 x height)")
        return None
    if not is_equirectangular_size(width, height) or camera is None:
        return None
    cam_w, cam_h = (camera.get("width"), camera.get("height")) if isinstance(camera, dict) else (camera.width, camera.height)
    if not (is_integer(cam_w) and is_integer(cam_h)) or is_equirectangular_size(cam_w, cam_h):
        return None
    name = camera.get("name") if isinstance(camera, dict) else camera.name
    return (f"reference.image {image} is {width}x{height} px, a 2:1 panorama's shape, but camera {name!r} is "
            f"{cam_w}x{cam_h}: if it is an equirectangular panorama set reference.projection to "
            f"\"{EQUIRECTANGULAR}\"; otherwise give an image of the camera's shape (it is not squashed to fit)")


def reference_file_problem(key: str, path: Path) -> str | None:
    """What is wrong with a reference file by its header (no decoding), or None.

    The image must be of the kind its name says and, where the header gives it, of a size the spec allows
    (each side MIN_SIZE_PX-MAX_SIZE_PX); a depth ``.npy`` must declare a 2-D real array of such a size and
    hold all of its data. The engine decodes the content later (``engine/io/inputs.py``).
    """
    suffix = path.suffix.lower()
    if key == "image":
        info = image_info(path)
        kind = info[0] if info else file_kind(path)
        expected = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff", ".exr": "exr"}[suffix]
        if kind is None or (expected in ("tiff", "exr") and kind != expected):
            names = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP", "tiff": "TIFF", "exr": "OpenEXR"}
            wanted = names[expected] if expected in ("tiff", "exr") else "PNG, JPEG or WebP"
            return f"{path} is not a readable {wanted} image"
        if info is not None and not (MIN_SIZE_PX <= info[1] <= MAX_SIZE_PX and MIN_SIZE_PX <= info[2] <= MAX_SIZE_PX):
            return f"{path} is {info[1]}x{info[2]} px; each side must be {MIN_SIZE_PX}-{MAX_SIZE_PX} px"
        return None
    if suffix == ".npy":
        try:
            npy_info(path, MIN_SIZE_PX, MAX_SIZE_PX)
        except ValueError as exc:
            return f"{path} {exc}"
        return None
    if file_kind(path) != "exr":
        return f"{path} is not an OpenEXR file"
    return None


def load_job(path: str | os.PathLike, check_files: bool = True) -> JobSpec:
    """Read a job spec file; relative paths in it are resolved against its folder."""
    path = Path(path)
    doc = read_json(path, "job spec")
    return JobSpec.from_json(doc, base_dir=path.parent, check_files=check_files).resolve(path.parent)


def read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyframeWorldsError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyframeWorldsError(f"cannot read {what} {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyframeWorldsError(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None


# --- result manifest -------------------------------------------------------------


#: WorldReel's 4D outputs of a frame, in the order of a manifest's ``files`` entry; each a bundle path or null (absent:
#: turned off in the job's ``geometry``, the last frame of a camera for the flow ones, or a bundle from before them).
#: point_map: world XYZ per pixel (EXR X Y Z); flow_observed / flow_rigid: forward flow to the next frame of the camera
#: (EXR u v, pixels); scene_flow: world motion in metres to the next frame (EXR X Y Z); dynamic_mask: PNG (0 static,
#: 128 unchecked, 255 dynamic). README "4D outputs" gives units, direction and validity.
FOUR_D_KEYS = ("point_map", "flow_observed", "flow_rigid", "scene_flow", "dynamic_mask")


@dataclass(frozen=True)
class ResultFrame:
    """One generated frame: its files (bundle-relative POSIX paths) and camera."""

    frame: int
    image: str
    depth_npy: str
    depth_exr: str | None = None
    point_map: str | None = None
    flow_observed: str | None = None
    flow_rigid: str | None = None
    scene_flow: str | None = None
    dynamic_mask: str | None = None
    #: The frame as the job's own lens sees it (PNG, the trajectory's ``source_lens``): the pinhole frame
    #: distorted back onto the plate's pixels. Only for a camera with lens distortion (JSON: absent otherwise).
    source_image: str | None = None

    def to_json(self) -> dict:
        return {"frame": self.frame, "image": self.image, "depth_npy": self.depth_npy, "depth_exr": self.depth_exr,
                **{key: getattr(self, key) for key in FOUR_D_KEYS},
                **({} if self.source_image is None else {"source_image": self.source_image})}

    @classmethod
    def from_json(cls, doc: dict) -> "ResultFrame":
        """From a (validated) ``files`` entry; the 4D keys may be missing (bundles written before them)."""
        return cls(doc["frame"], doc["image"], doc["depth_npy"], doc.get("depth_exr"), **{key: doc.get(key) for key in FOUR_D_KEYS},
                   source_image=doc.get("source_image"))


@dataclass(frozen=True)
class ResultTrajectory:
    """The generated video of one camera: frames, per-frame files and the cameras they were made for."""

    trajectory: Trajectory
    frames: tuple[ResultFrame, ...]
    video: str | None = None  # MP4 (H.264), one frame per trajectory frame
    #: The camera as the job gave it, with its lens distortion, when ``trajectory`` is the pinhole it was undistorted
    #: to (the cameras the frames were made for); None: the job's camera was a pinhole. JSON: ``source_lens``, per
    #: frame ``{"fx", "fy", "cx", "cy", "distortion"}`` (poses, size and images are ``trajectory``'s).
    source: Trajectory | None = None
    #: The video in the job's own lens (MP4 of the frames' ``source_image``), lining up with the plate; None where
    #: ``source`` is None. JSON: ``source_video``, absent when None.
    source_video: str | None = None

    def source_lens_json(self) -> list[dict] | None:
        if self.source is None:
            return None
        return [{key: frame.get(key) for key in SOURCE_LENS_KEYS} for frame in self.source.to_json()["frames"]]


#: What a manifest trajectory holds beside the trajectory's own keys.
RESULT_TRAJECTORY_KEYS = ("video", "files", "source_lens", "source_video")
#: The keys of a ``source_lens`` entry: what undistortion changes in a frame.
SOURCE_LENS_KEYS = ("fx", "fy", "cx", "cy", "distortion")


def _source_trajectory_json(traj_doc: dict, source_lens: list) -> dict:
    """The trajectory JSON ``traj_doc`` with each frame's intrinsics and lens taken from ``source_lens``."""
    frames = [{**{k: v for k, v in frame.items() if k not in SOURCE_LENS_KEYS},
               **{k: v for k, v in lens.items() if v is not None}} for frame, lens in zip(traj_doc["frames"], source_lens)]
    return {**traj_doc, "frames": frames}


@dataclass(frozen=True)
class ResultMesh:
    """A depth-textured mesh of one keyframe: PLY with UVs in world space, plus its texture image."""

    trajectory: str
    frame: int
    path: str
    texture: str


@dataclass(frozen=True)
class ResultManifest:
    """What a finished job produced. Every path is relative to the bundle folder."""

    job_name: str
    generator: str
    generator_label: str  # what a person should know about it, e.g. "geometric preview, not a learned model"
    trajectories: tuple[ResultTrajectory, ...]
    point_cloud: str | None = None  # binary PLY, world space, with colours
    point_count: int = 0
    meshes: tuple[ResultMesh, ...] = ()
    seed: int = 0
    version: int = MANIFEST_VERSION
    warnings: tuple[str, ...] = ()  # what a person must know about how the result was made (a flat reference, ...)

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "job": {"name": self.job_name, "generator": self.generator, "seed": self.seed},
            "generator_label": self.generator_label,
            "trajectories": [
                {
                    **rt.trajectory.to_json(),
                    "video": rt.video,
                    "files": [f.to_json() for f in rt.frames],
                    **({} if rt.source is None else {"source_lens": rt.source_lens_json()}),
                    **({} if rt.source_video is None else {"source_video": rt.source_video}),
                }
                for rt in self.trajectories
            ],
            "point_cloud": None if self.point_cloud is None else {"path": self.point_cloud, "points": self.point_count},
            "meshes": [{"trajectory": m.trajectory, "frame": m.frame, "path": m.path, "texture": m.texture} for m in self.meshes],
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, doc: Any, bundle_dir: str | os.PathLike | None = None) -> "ResultManifest":
        problems = validate_manifest(doc, bundle_dir)
        if problems:
            raise ValidationError("result manifest", problems)
        trajs = []
        for i, t in enumerate(doc["trajectories"]):
            traj_doc = {k: v for k, v in t.items() if k not in RESULT_TRAJECTORY_KEYS}
            files = tuple(ResultFrame.from_json(f) for f in t["files"])
            source = None
            if t.get("source_lens") is not None:
                source = Trajectory.from_json(_source_trajectory_json(traj_doc, t["source_lens"]), f"trajectories[{i}].source_lens")
            trajs.append(ResultTrajectory(Trajectory.from_json(traj_doc, f"trajectories[{i}]"), files, t.get("video"), source,
                                          t.get("source_video")))
        pc = doc.get("point_cloud")
        return cls(
            job_name=doc["job"]["name"],
            generator=doc["job"]["generator"],
            generator_label=doc["generator_label"],
            trajectories=tuple(trajs),
            point_cloud=None if pc is None else pc["path"],
            point_count=0 if pc is None else pc["points"],
            meshes=tuple(ResultMesh(m["trajectory"], m["frame"], m["path"], m["texture"]) for m in doc.get("meshes", [])),
            seed=doc["job"].get("seed", 0),
            version=doc["version"],
            warnings=tuple(doc.get("warnings", ())),
        )


MANIFEST_FILENAME = "manifest.json"
#: A job folder's spec (beside its reference files): what ``validate``, ``run`` and the farm tools read in a folder.
JOB_FILENAME = "job.json"


def load_manifest(bundle_dir: str | os.PathLike, check_files: bool = True) -> ResultManifest:
    """Read ``manifest.json`` of a result bundle folder; with ``check_files`` every listed file must exist."""
    bundle = Path(bundle_dir)
    doc = read_json(bundle / MANIFEST_FILENAME, "result manifest")
    return ResultManifest.from_json(doc, bundle if check_files else None)


def check_bundle_path(problems: list[Problem], path: str, value: Any, bundle_dir, optional: bool = False) -> None:
    """A bundle-relative POSIX path that cannot leave the bundle; with ``bundle_dir``, the file must exist."""
    if value is None and optional:
        return
    if not check_string(problems, path, value):
        return
    pure = PurePosixPath(value)
    if pure.is_absolute() or "\\" in value or ".." in pure.parts or (len(value) > 1 and value[1] == ":"):
        problems.append(Problem(path, f"must be a relative path inside the bundle, got {value!r}"))
        return
    if bundle_dir is not None and not (Path(bundle_dir) / value).is_file():
        problems.append(Problem(path, f"file not found in bundle: {value}"))


def validate_manifest(doc: Any, bundle_dir: str | os.PathLike | None = None) -> list[Problem]:
    """Every problem of a result manifest; with ``bundle_dir`` also every missing file. Never raises."""
    try:
        return _validate_manifest(doc, bundle_dir)
    except Exception as exc:
        return [Problem("", f"could not be validated: {type(exc).__name__}: {exc}")]


def _validate_manifest(doc: Any, bundle_dir) -> list[Problem]:
    problems: list[Problem] = []
    if not isinstance(doc, dict):
        return [Problem("(document)", f"must be an object, got {type_name(doc)}")]
    for key in doc:
        if key not in {"version", "job", "generator_label", "trajectories", "point_cloud", "meshes", "warnings"}:
            problems.append(Problem(key, "unknown field"))
    warnings = doc.get("warnings", [])
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        problems.append(Problem("warnings", "must be a list of strings"))
    if doc.get("version") != MANIFEST_VERSION or not is_integer(doc.get("version")):
        problems.append(Problem("version", f"unsupported result manifest version {doc.get('version')!r}; this reads version {MANIFEST_VERSION}"))
    job = doc.get("job")
    if check_object(problems, "job", job):
        check_string(problems, "job.name", job.get("name"))
        if check_string(problems, "job.generator", job.get("generator")) and job["generator"] not in GENERATORS:
            problems.append(Problem("job.generator", f"unknown generator {job['generator']!r}"))
        if "seed" in job:
            check_integer(problems, "job.seed", job["seed"], minimum=0)
    check_string(problems, "generator_label", doc.get("generator_label"))
    trajs = doc.get("trajectories")
    names: dict[str, set] = {}
    if not isinstance(trajs, list) or not trajs:
        problems.append(Problem("trajectories", "must be a non-empty list"))
    else:
        for i, t in enumerate(trajs):
            tpath = f"trajectories[{i}]"
            if not check_object(problems, tpath, t):
                continue
            traj_doc = {k: v for k, v in t.items() if k not in RESULT_TRAJECTORY_KEYS}
            traj_problems = validate_trajectory_json(traj_doc, tpath)
            problems.extend(traj_problems)
            lens = t.get("source_lens")
            if lens is not None and not traj_problems:
                problems.extend(_source_lens_problems(traj_doc, lens, tpath))
            check_bundle_path(problems, f"{tpath}.video", t.get("video"), bundle_dir, optional=True)
            check_bundle_path(problems, f"{tpath}.source_video", t.get("source_video"), bundle_dir, optional=True)
            files = t.get("files")
            in_source_lens = t.get("source_video") is not None or (isinstance(files, list) and any(
                isinstance(f, dict) and f.get("source_image") is not None for f in files))
            if lens is None and in_source_lens:
                problems.append(Problem(f"{tpath}.source_lens", "is missing, but the camera has files in its source lens "
                                        "(source_video, source_image)"))
            frames = t.get("frames") if isinstance(t.get("frames"), list) else []
            numbers = [f.get("frame") for f in frames if isinstance(f, dict)]
            if isinstance(t.get("name"), str):
                names[t["name"]] = set(n for n in numbers if is_integer(n))
            if not isinstance(files, list):
                problems.append(Problem(f"{tpath}.files", f"must be a list, got {type_name(files)}"))
                continue
            if len(files) != len(frames):
                problems.append(Problem(f"{tpath}.files", f"has {len(files)} entries for {len(frames)} frames"))
            for j, f in enumerate(files):
                fp = f"{tpath}.files[{j}]"
                if not check_object(problems, fp, f):
                    continue
                if check_integer(problems, f"{fp}.frame", f.get("frame")) and j < len(numbers) and f["frame"] != numbers[j]:
                    problems.append(Problem(f"{fp}.frame", f"is {f['frame']} but the camera at this index is frame {numbers[j]}"))
                check_bundle_path(problems, f"{fp}.image", f.get("image"), bundle_dir)
                check_bundle_path(problems, f"{fp}.depth_npy", f.get("depth_npy"), bundle_dir)
                check_bundle_path(problems, f"{fp}.depth_exr", f.get("depth_exr"), bundle_dir, optional=True)
                for key in (*FOUR_D_KEYS, "source_image"):  # optional: manifests written before them have none
                    check_bundle_path(problems, f"{fp}.{key}", f.get(key), bundle_dir, optional=True)
                if len(problems) > 500:
                    return problems
    pc = doc.get("point_cloud")
    if pc is not None and check_object(problems, "point_cloud", pc):
        check_bundle_path(problems, "point_cloud.path", pc.get("path"), bundle_dir)
        check_integer(problems, "point_cloud.points", pc.get("points"), minimum=0)
    meshes = doc.get("meshes", [])
    if not isinstance(meshes, list):
        problems.append(Problem("meshes", f"must be a list, got {type_name(meshes)}"))
    else:
        for i, m in enumerate(meshes):
            mp = f"meshes[{i}]"
            if not check_object(problems, mp, m):
                continue
            if check_string(problems, f"{mp}.trajectory", m.get("trajectory")) and names and m["trajectory"] not in names:
                problems.append(Problem(f"{mp}.trajectory", f"no trajectory named {m['trajectory']!r}"))
            if check_integer(problems, f"{mp}.frame", m.get("frame")) and m.get("trajectory") in names and m["frame"] not in names[m["trajectory"]]:
                problems.append(Problem(f"{mp}.frame", f"frame {m['frame']} is not in trajectory {m['trajectory']!r}"))
            check_bundle_path(problems, f"{mp}.path", m.get("path"), bundle_dir)
            check_bundle_path(problems, f"{mp}.texture", m.get("texture"), bundle_dir)
    return problems


def _source_lens_problems(traj_doc: dict, lens: Any, tpath: str) -> list[Problem]:
    """A manifest trajectory's ``source_lens``: one entry per frame, each the intrinsics and lens of a valid frame."""
    if not isinstance(lens, list) or len(lens) != len(traj_doc["frames"]):
        return [Problem(f"{tpath}.source_lens", f"must be a list of one entry per frame ({len(traj_doc['frames'])})")]
    problems: list[Problem] = []
    for j, entry in enumerate(lens):
        if check_object(problems, f"{tpath}.source_lens[{j}]", entry):
            check_unknown_keys(problems, f"{tpath}.source_lens[{j}]", entry, set(SOURCE_LENS_KEYS))
    if problems:
        return problems
    # The frames' own validation, with its paths named after source_lens.
    return [Problem(p.path.replace(f"{tpath}.frames[", f"{tpath}.source_lens["), p.reason)
            for p in validate_trajectory_json(_source_trajectory_json(traj_doc, lens), tpath)]


def write_json_atomic(path: str | os.PathLike, doc: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    with atomic_write(path, fsync=True) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
