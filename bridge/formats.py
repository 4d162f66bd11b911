"""Trajectory files: read and write every format the project exchanges cameras in.

Formats (``FORMATS``); what each holds besides poses and pinhole intrinsics:

- ``keyframe-worlds``: JSON ``{"format": "keyframe-worlds/trajectories", "version": 1,
  "trajectories": [<trajectory JSON>]}`` (see ``trajectory.py``); a bare trajectory
  object is read too. Lossless: every lens model, image paths. No points.
- ``worldstereo``: the upstream ``camera.json``: ``extrinsic`` = list of world-to-camera
  4x4 (OpenCV camera frame), ``intrinsic`` = list of 3x3 pixel K. One camera per file,
  pinhole lenses only. Upstream files may lack the size; it is then taken from
  ``width``/``height`` keys, an ``image.png`` beside the file (any of PNG/JPEG/WebP,
  whatever its name says), or ``2 * (cx, cy)``. We also write ``width``, ``height``,
  ``frames``, ``fps``, ``name`` and, when known, ``images`` (upstream readers ignore them).
- ``nerfstudio``: ``transforms.json`` with per-frame ``transform_matrix`` (camera-to-world,
  OpenGL camera frame) and ``file_path``; ``fl_x fl_y cx cy w h``, ``k1 k2 k3 k4 p1 p2``
  at the top level when every frame shares them (nerfstudio then ignores per-frame
  values), else per frame; one ``camera_model`` (``OPENCV``, ``OPENCV_FISHEYE``) per
  file. instant-ngp's ``is_fisheye`` is read too. A COLMAP model that is a special case
  of these (SIMPLE_RADIAL, RADIAL, FULL_OPENCV without its rational terms, the radial
  fisheyes) is written as it, with its own name in ``keyframe_worlds_camera_model``.
- ``colmap`` (text) and ``colmap-binary``: a COLMAP sparse model folder (``colmap.py``):
  every lens model, image ``NAME``s, and ``points3D`` with tracks.
- ``pano_bank``: upstream WorldStereo's panorama memory bank, a folder ``pano_bank/`` with
  ``cameras.json`` ``{"0000": {"extrinsic": <world-to-camera 4x4, OpenCV>, "intrinsic": <3x3 pixel K>}, ...}``
  and one ``images/<key>.png`` per key (the views cut from a panorama, all of one camera). One camera,
  pinhole only; the size comes from the images (else ``2 * (cx, cy)``). We also write each entry's
  ``width``/``height`` and a ``keyframe_worlds`` entry with the camera's name and fps (upstream reads only the keys
  of its images). Frame numbers are the keys; each frame's image is ``images/<key>.png``.

Camera names and frame numbers travel in generated image names (``<camera>/<frame:06d>.png``;
nerfstudio's under ``images/``) for frames without an image path; frames with one keep it,
and their camera and frame go in ``keyframe_worlds_camera``/``keyframe_worlds_frame``
(nerfstudio), a ``# keyframe-worlds image`` comment (COLMAP text) or ``keyframe_worlds.json``
beside a binary model, which also holds the fps that text models keep in a comment.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from . import cameras, colmap
from .atomic import atomic_write
from .cameras import LENS_MODELS, Distortion
from .errors import KeyframeWorldsError, ValidationError
from .imageinfo import image_info
from .sparse import SparsePoints
from .spec import read_json
from .trajectory import Trajectory

FORMATS = ("keyframe-worlds", "worldstereo", "nerfstudio", "colmap", "colmap-binary", "pano_bank")
POINT_FORMATS = ("colmap", "colmap-binary")
"""The formats that hold sparse points; the others write the cameras only."""
KW_FORMAT_TAG = "keyframe-worlds/trajectories"
COLMAP_EXTRAS_FILE = "keyframe_worlds.json"
COLMAP_EXTRAS_TAG = "keyframe-worlds/colmap-extras"
# Upstream WorldStereo trajectories are generated for Wan2.1, which runs at 16 fps.
WORLDSTEREO_DEFAULT_FPS = 16.0
DEFAULT_FPS = 24.0


@dataclass(frozen=True)
class TrajectorySet:
    """What one trajectory file or folder holds: the cameras, and the sparse points of a COLMAP model (or None)."""

    trajectories: tuple[Trajectory, ...]
    points: SparsePoints | None = None

    def select(self, names: Iterable[str]) -> "TrajectorySet":
        """Only the cameras named, and only the track elements of their frames."""
        names = set(names)
        kept = tuple(t for t in self.trajectories if t.name in names)
        points = self.points
        if points is not None:
            points = points.select_views({(t.name, int(f)) for t in kept for f in t.frames})
        return TrajectorySet(kept, points)


# --- detection, dispatch ----------------------------------------------------------


def detect_format(path: str | os.PathLike) -> str:
    """Which trajectory format a file or folder holds; raises ``KeyframeWorldsError`` if none."""
    p = Path(path)
    if p.is_dir():
        kind = colmap.model_kind(p)
        if kind is not None:
            return "colmap" if kind == "text" else "colmap-binary"
        if (p / "transforms.json").is_file():
            return "nerfstudio"
        if _pano_bank_file(p) is not None:
            return "pano_bank"
        if (p / "camera.json").is_file() or any(p.glob("*/camera.json")):
            return "worldstereo"
        raise KeyframeWorldsError(f"{p} is a folder with no trajectory file (cameras.txt + images.txt, cameras.bin + images.bin, "
                                  "transforms.json or camera.json)")
    if not p.exists():
        raise KeyframeWorldsError(f"trajectory file not found: {p}")
    if p.name in colmap.TEXT_FILES:
        return "colmap"
    if p.name in colmap.BINARY_FILES:
        return "colmap-binary"
    doc = read_json(p, "trajectory file")
    if isinstance(doc, dict):
        if doc.get("format") == KW_FORMAT_TAG or "trajectories" in doc:
            return "keyframe-worlds"
        if "extrinsic" in doc:
            return "worldstereo"
        if p.name == PANO_BANK_CAMERAS and any(PANO_BANK_KEY.match(k) for k in doc):
            return "pano_bank"
        frames = doc.get("frames")
        if isinstance(frames, list) and frames and isinstance(frames[0], dict):
            if "transform_matrix" in frames[0]:
                return "nerfstudio"
            if "c2w_opencv" in frames[0]:
                return "keyframe-worlds"
    raise KeyframeWorldsError(f"cannot tell the trajectory format of {p}; give it with --from ({', '.join(FORMATS)})")


def read_trajectory_set(path: str | os.PathLike, fmt: str | None = None) -> TrajectorySet:
    """Read every camera trajectory, and the sparse points where the format has them, of format ``fmt`` (detected when None)."""
    fmt = fmt or detect_format(path)
    readers = {
        "keyframe-worlds": read_keyframe_worlds,
        "worldstereo": read_worldstereo,
        "nerfstudio": read_nerfstudio,
        "colmap": lambda p: read_colmap(p, binary=False),
        "colmap-binary": lambda p: read_colmap(p, binary=True),
        "pano_bank": read_pano_bank,
    }
    if fmt not in readers:
        raise KeyframeWorldsError(f"unknown trajectory format {fmt!r}; known: {', '.join(FORMATS)}")
    result = readers[fmt](Path(path))
    tset = result if isinstance(result, TrajectorySet) else TrajectorySet(tuple(result))
    for i, traj in enumerate(tset.trajectories):
        problems = traj.problems(f"{Path(path).name}: trajectory {traj.name!r}")
        if problems:
            raise ValidationError(f"trajectory {i} read from {path}", problems)
    return tset


def read_trajectories(path: str | os.PathLike, fmt: str | None = None) -> list[Trajectory]:
    """Read every camera trajectory in a file or folder of format ``fmt`` (detected when None)."""
    return list(read_trajectory_set(path, fmt).trajectories)


def write_trajectory_set(tset: TrajectorySet, path: str | os.PathLike, fmt: str) -> list[Path]:
    """Write a trajectory set in format ``fmt``; returns the files written.

    ``worldstereo`` holds one camera per file: with several cameras, ``path`` is
    a folder that gets ``<camera>/camera.json`` each (a folder ``path`` with one
    camera gets ``path/camera.json``). ``colmap`` and ``colmap-binary`` write into
    the folder ``path``, the points too. The others write the single file ``path``
    and no points (``POINT_FORMATS`` says which hold them). A lens model the format
    cannot hold raises ``KeyframeWorldsError`` naming the camera, the model and the format.
    """
    trajectories = list(tset.trajectories)
    if not trajectories:
        raise KeyframeWorldsError("no trajectories to write")
    writers = {
        "keyframe-worlds": write_keyframe_worlds,
        "worldstereo": write_worldstereo,
        "nerfstudio": write_nerfstudio,
        "colmap": lambda t, p: write_colmap(TrajectorySet(tuple(t), tset.points), p, binary=False),
        "colmap-binary": lambda t, p: write_colmap(TrajectorySet(tuple(t), tset.points), p, binary=True),
        "pano_bank": write_pano_bank,
    }
    if fmt not in writers:
        raise KeyframeWorldsError(f"unknown trajectory format {fmt!r}; known: {', '.join(FORMATS)}")
    names = [t.name for t in trajectories]
    if len(set(names)) != len(names):
        raise KeyframeWorldsError(f"camera names must be unique, got {names}")
    return writers[fmt](trajectories, Path(path))


def write_trajectories(trajectories: Sequence[Trajectory], path: str | os.PathLike, fmt: str) -> list[Path]:
    """Write trajectories (no points) in format ``fmt``; see ``write_trajectory_set``."""
    return write_trajectory_set(TrajectorySet(tuple(trajectories)), path, fmt)


def _write_text(path: Path, text: str) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _matrix(value: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    try:
        m = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise KeyframeWorldsError(f"{where}: must be a {shape[0]}x{shape[1]} array of numbers") from None
    if m.shape != shape:
        raise KeyframeWorldsError(f"{where}: must be {shape[0]}x{shape[1]}, got shape {list(m.shape)}")
    if not np.all(np.isfinite(m)):
        raise KeyframeWorldsError(f"{where}: has non-finite entries")
    return m


def _image_name(camera: str, frame: int) -> str:
    """The image name written for a frame without an image path; it carries the camera and frame."""
    return f"{camera}/{frame:06d}.png"


_TRAILING_NUMBER = re.compile(r"(-?\d+)(?=\.[A-Za-z0-9]+$|$)")


def _parse_image_name(name: str, fallback_camera: str, index: int) -> tuple[str, int]:
    """Camera name and frame number from ``<camera>/<frame>.png``; generic names use their digits or the index."""
    pure = PurePosixPath(name.replace("\\", "/"))
    match = _TRAILING_NUMBER.search(pure.name)
    frame = int(match.group(1)) if match else index
    parent = pure.parent.name
    camera = parent if parent and parent not in ("images", ".") else fallback_camera
    return camera, frame


class _Frame(NamedTuple):
    """One frame as a reader finds it, before frames are grouped into trajectories."""

    camera: str
    frame: int
    c2w_opencv: np.ndarray
    intrinsics: tuple  # (fx, fy, cx, cy, width, height)
    distortion: Distortion | None = None
    image: str | None = None


def _group_sorted(entries: list[_Frame], fps: dict[str, float]) -> list[Trajectory]:
    """Build trajectories from frames, grouped by camera in order of first appearance, each sorted by frame."""
    groups: dict[str, list[_Frame]] = defaultdict(list)
    for entry in entries:
        groups[entry.camera].append(entry)
    out = []
    for name, items in groups.items():
        items.sort(key=lambda e: e.frame)
        sizes = {e.intrinsics[4:6] for e in items}
        if len(sizes) != 1:
            raise KeyframeWorldsError(f"camera {name!r}: frames have different image sizes {sorted(sizes)}; a trajectory has one size")
        (w, h), = sizes
        out.append(
            Trajectory(
                name=name,
                frames=[e.frame for e in items],
                c2w_opencv=np.stack([e.c2w_opencv for e in items]),
                fx=[e.intrinsics[0] for e in items],
                fy=[e.intrinsics[1] for e in items],
                cx=[e.intrinsics[2] for e in items],
                cy=[e.intrinsics[3] for e in items],
                width=w,
                height=h,
                fps=fps.get(name, DEFAULT_FPS),
                distortion=[e.distortion for e in items],
                images=[e.image for e in items],
            )
        )
    return out


def _cannot_hold(traj: Trajectory, i: int, fmt: str, why: str) -> KeyframeWorldsError:
    d = traj.distortion[i]
    return KeyframeWorldsError(f"camera {traj.name!r} frame {int(traj.frames[i])}: camera model {d.model if d else 'PINHOLE'} "
                               f"cannot be written as {fmt}: {why}")


# --- keyframe-worlds ---------------------------------------------------------------


def read_keyframe_worlds(path: Path) -> list[Trajectory]:
    doc = read_json(path, "trajectory file")
    if isinstance(doc, dict) and "trajectories" in doc:
        if doc.get("version", 1) != 1:
            raise KeyframeWorldsError(f"{path}: unsupported keyframe-worlds trajectory file version {doc.get('version')!r}")
        items = doc["trajectories"]
        if not isinstance(items, list) or not items:
            raise KeyframeWorldsError(f"{path}: 'trajectories' must be a non-empty list")
        return [Trajectory.from_json(t, f"{path.name}: trajectories[{i}]") for i, t in enumerate(items)]
    return [Trajectory.from_json(doc, path.name)]


def write_keyframe_worlds(trajectories: list[Trajectory], path: Path) -> list[Path]:
    doc = {"format": KW_FORMAT_TAG, "version": 1, "trajectories": [t.to_json() for t in trajectories]}
    return [_write_text(path, json.dumps(doc, indent=1) + "\n")]


# --- worldstereo camera.json ------------------------------------------------------


def read_worldstereo(path: Path) -> list[Trajectory]:
    """One ``camera.json``, or a folder holding one or one per camera sub-folder (``<camera>/camera.json``)."""
    if path.is_dir():
        if (path / "camera.json").is_file():
            path = path / "camera.json"
        else:
            files = sorted(path.glob("*/camera.json"))
            if not files:
                raise KeyframeWorldsError(f"{path}: no camera.json in the folder or its sub-folders")
            return [t for f in files for t in read_worldstereo(f)]
    doc = read_json(path, "trajectory file")
    if not isinstance(doc, dict) or "extrinsic" not in doc or "intrinsic" not in doc:
        raise KeyframeWorldsError(f"{path}: a WorldStereo camera.json needs 'extrinsic' and 'intrinsic' lists")
    ext, intr = doc["extrinsic"], doc["intrinsic"]
    if not isinstance(ext, list) or not isinstance(intr, list) or not ext:
        raise KeyframeWorldsError(f"{path}: 'extrinsic' and 'intrinsic' must be non-empty lists")
    if len(ext) != len(intr):
        raise KeyframeWorldsError(f"{path}: {len(ext)} extrinsics but {len(intr)} intrinsics")
    w2c = np.stack([_matrix(m, (4, 4), f"{path.name}: extrinsic[{i}]") for i, m in enumerate(ext)])
    k = np.stack([_matrix(m, (3, 3), f"{path.name}: intrinsic[{i}]") for i, m in enumerate(intr)])
    if "width" in doc and "height" in doc:
        width, height = int(doc["width"]), int(doc["height"])
    elif (info := image_info(path.parent / "image.png")) is not None:
        width, height = info[1], info[2]
    else:
        width, height = int(round(2 * k[0, 0, 2])), int(round(2 * k[0, 1, 2]))
    frames = doc.get("frames", list(range(len(ext))))
    if not isinstance(frames, list) or len(frames) != len(ext):
        raise KeyframeWorldsError(f"{path}: 'frames' must list one frame number per extrinsic")
    images = doc.get("images")
    if images is not None and not (isinstance(images, list) and len(images) == len(ext)
                                   and all(i is None or isinstance(i, str) for i in images)):
        raise KeyframeWorldsError(f"{path}: 'images' must list one image path (or null) per extrinsic")
    return [
        Trajectory(
            name=str(doc.get("name") or path.parent.name or "camera"),
            frames=frames,
            c2w_opencv=cameras.w2c_to_c2w(w2c),
            fx=k[:, 0, 0],
            fy=k[:, 1, 1],
            cx=k[:, 0, 2],
            cy=k[:, 1, 2],
            width=width,
            height=height,
            fps=float(doc.get("fps", WORLDSTEREO_DEFAULT_FPS)),
            images=images,
        )
    ]


def write_worldstereo(trajectories: list[Trajectory], path: Path) -> list[Path]:
    for traj in trajectories:
        for i, d in enumerate(traj.distortion):
            # A zero-parameter OPENCV (or SIMPLE_PINHOLE) projects exactly like the pinhole K written here.
            if d is not None and not d.is_pinhole:
                raise _cannot_hold(traj, i, "worldstereo", "camera.json holds pinhole cameras only (undistort first)")
    if len(trajectories) == 1:
        targets = [(trajectories[0], path if path.suffix == ".json" else path / "camera.json")]
    else:
        targets = [(t, path / t.name / "camera.json") for t in trajectories]
    written = []
    for traj, target in targets:
        doc = {
            "name": traj.name,
            "width": traj.width,
            "height": traj.height,
            "fps": traj.fps,
            "frames": traj.frames.tolist(),
            "extrinsic": cameras.c2w_to_w2c(traj.c2w_opencv).tolist(),
            "intrinsic": traj.k.tolist(),
        }
        if any(i is not None for i in traj.images):
            doc["images"] = list(traj.images)
        written.append(_write_text(target, json.dumps(doc, indent=1) + "\n"))
    return written


# --- nerfstudio transforms.json -----------------------------------------------------

_NS_DISTORTION = ("k1", "k2", "k3", "k4", "p1", "p2")
_NS_INTRINSICS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
_NS_MODEL_KEY = "keyframe_worlds_camera_model"


def _nerfstudio_to_distortion(camera_model: str, k: dict[str, float], ours: Any, where: str) -> Distortion | None:
    """nerfstudio's ``camera_model`` with ``k1 k2 k3 k4 p1 p2`` as one of our lens models.

    nerfstudio's OPENCV is ``1 + k1 r^2 + k2 r^4 + k3 r^6 + k4 r^8`` with tangential
    p1, p2; its OPENCV_FISHEYE is COLMAP's. ``ours`` is the COLMAP model name we wrote
    beside them (``keyframe_worlds_camera_model``), or None for a file from elsewhere,
    which reads as the plainest model that holds its parameters.
    """
    if ours is not None and ours not in LENS_MODELS:
        raise KeyframeWorldsError(f"{where}: {_NS_MODEL_KEY} {ours!r} is not a camera model; known: {', '.join(LENS_MODELS)}")
    if camera_model in ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV"):
        if k["k4"]:
            raise KeyframeWorldsError(f"{where}: k4={k['k4']:g} (nerfstudio's r^8 radial term) has no COLMAP camera model")
        if camera_model != "OPENCV" and any(k.values()):
            raise KeyframeWorldsError(f"{where}: camera_model {camera_model} cannot have distortion "
                                      f"({', '.join(f'{n}={v:g}' for n, v in k.items() if v)})")
        coeffs = (k["k1"], k["k2"], k["p1"], k["p2"], k["k3"], 0.0, 0.0, 0.0)
        if ours is None:
            if not any(coeffs):
                return None
            ours = "FULL_OPENCV" if k["k3"] else "OPENCV"
    elif camera_model == "OPENCV_FISHEYE":
        if k["p1"] or k["p2"]:
            raise KeyframeWorldsError(f"{where}: camera_model OPENCV_FISHEYE has no tangential terms, got p1={k['p1']:g} p2={k['p2']:g}")
        coeffs = (k["k1"], k["k2"], k["k3"], k["k4"])
        ours = ours or "OPENCV_FISHEYE"
    else:
        raise KeyframeWorldsError(f"{where}: camera_model {camera_model!r} is not supported (supported: OPENCV, OPENCV_FISHEYE, PINHOLE)")
    if LENS_MODELS[ours].fisheye != (camera_model == "OPENCV_FISHEYE"):
        raise KeyframeWorldsError(f"{where}: {_NS_MODEL_KEY} {ours} does not fit camera_model {camera_model}")
    try:
        return Distortion.from_opencv_coefficients(ours, coeffs)
    except KeyframeWorldsError as exc:
        raise KeyframeWorldsError(f"{where}: {exc}") from None


def _distortion_to_nerfstudio(traj: Trajectory, i: int) -> tuple[str, dict[str, float]]:
    """nerfstudio's ``camera_model`` and ``k1 k2 k3 k4 p1 p2`` for frame ``i``; refuses what nerfstudio cannot model."""
    d = traj.distortion[i]
    if d is None:
        return "OPENCV", dict.fromkeys(_NS_DISTORTION, 0.0)
    c = d.opencv_coefficients()
    if d.lens.fisheye:
        return "OPENCV_FISHEYE", {"k1": c[0], "k2": c[1], "k3": c[2], "k4": c[3], "p1": 0.0, "p2": 0.0}
    k1, k2, p1, p2, k3, k4, k5, k6 = c
    if k4 or k5 or k6:
        raise _cannot_hold(traj, i, "nerfstudio", f"its OPENCV model has no rational terms (k4={k4:g} k5={k5:g} k6={k6:g})")
    return "OPENCV", {"k1": k1, "k2": k2, "k3": k3, "k4": 0.0, "p1": p1, "p2": p2}


def read_nerfstudio(path: Path) -> list[Trajectory]:
    if path.is_dir():
        path = path / "transforms.json"
    doc = read_json(path, "trajectory file")
    if not isinstance(doc, dict) or not isinstance(doc.get("frames"), list) or not doc["frames"]:
        raise KeyframeWorldsError(f"{path}: a nerfstudio transforms.json needs a non-empty 'frames' list")
    extra = doc.get("keyframe_worlds", {}) if isinstance(doc.get("keyframe_worlds"), dict) else {}
    fallback = str(extra.get("camera") or path.parent.name or "camera")
    entries = []
    for i, frame in enumerate(doc["frames"]):
        where = f"{path.name}: frames[{i}]"
        if not isinstance(frame, dict):
            raise KeyframeWorldsError(f"{where}: must be an object")

        def get(key: str, default: Any = None):
            # Per frame first, then the top level (our files never hold a key in both places).
            value = frame.get(key, doc.get(key, default))
            if value is None:
                raise KeyframeWorldsError(f"{where}: missing '{key}' (neither per frame nor at the top level)")
            return value

        try:
            k = {key: float(get(key, 0.0)) for key in _NS_DISTORTION}
        except (TypeError, ValueError):
            raise KeyframeWorldsError(f"{where}: distortion {', '.join(_NS_DISTORTION)} must be numbers") from None
        # instant-ngp marks fisheyes with is_fisheye instead of a camera_model.
        model = frame.get("camera_model", doc.get("camera_model")) or ("OPENCV_FISHEYE" if get("is_fisheye", False) else "OPENCV")
        distortion = _nerfstudio_to_distortion(model, k, frame.get(_NS_MODEL_KEY, doc.get(_NS_MODEL_KEY)), where)
        c2w = cameras.c2w_nerfstudio_to_opencv(_matrix(frame.get("transform_matrix"), (4, 4), f"{where}.transform_matrix"))
        file_path = frame.get("file_path")
        camera, number = _parse_image_name(str(file_path or ""), fallback, i)
        camera = str(frame.get("keyframe_worlds_camera", camera))
        number = frame.get("keyframe_worlds_frame", number)
        if not isinstance(number, int) or isinstance(number, bool):
            raise KeyframeWorldsError(f"{where}: keyframe_worlds_frame must be an integer, got {number!r}")
        image = None if file_path in (None, "", f"images/{_image_name(camera, number)}") else str(file_path)
        intr = (float(get("fl_x")), float(get("fl_y")), float(get("cx")), float(get("cy")), int(get("w")), int(get("h")))
        entries.append(_Frame(camera, number, c2w, intr, distortion, image))
    fps = extra.get("fps", {}) if isinstance(extra.get("fps"), dict) else {}
    return _group_sorted(entries, {k: float(v) for k, v in fps.items()})


def write_nerfstudio(trajectories: list[Trajectory], path: Path) -> list[Path]:
    if path.suffix != ".json":
        path = path / "transforms.json"
    frames, models = [], {}
    for traj in trajectories:
        c2w_gl = cameras.c2w_opencv_to_nerfstudio(traj.c2w_opencv)
        for i in range(len(traj)):
            model, k = _distortion_to_nerfstudio(traj, i)
            models.setdefault(model, traj.name)
            frame = {
                "file_path": traj.images[i] or f"images/{_image_name(traj.name, int(traj.frames[i]))}",
                "keyframe_worlds_camera": traj.name,
                "transform_matrix": c2w_gl[i].tolist(),
                "fl_x": float(traj.fx[i]), "fl_y": float(traj.fy[i]), "cx": float(traj.cx[i]), "cy": float(traj.cy[i]),
                "w": traj.width, "h": traj.height,
                **k,
            }
            if traj.images[i] is not None:  # the name no longer says which frame it is
                frame["keyframe_worlds_frame"] = int(traj.frames[i])
            if traj.distortion[i] is not None:
                frame[_NS_MODEL_KEY] = traj.distortion[i].model
            frames.append(frame)
    if len(models) > 1:
        raise KeyframeWorldsError("cannot be written as nerfstudio, which has one camera_model per file: "
                                  + ", ".join(f"camera {name!r} is {model}" for model, name in models.items()))
    doc: dict[str, Any] = {"camera_model": next(iter(models))}
    # nerfstudio takes a top-level value for every frame and then ignores per-frame ones (the
    # distortion keys as one group), so a value goes to the top level only when all frames share it.
    for group in [(key,) for key in _NS_INTRINSICS + (_NS_MODEL_KEY,)] + [_NS_DISTORTION]:
        values = {tuple(f.get(key) for key in group) for f in frames}
        if len(values) == 1 and None not in next(iter(values)):
            doc.update(zip(group, next(iter(values))))
            for f in frames:
                for key in group:
                    del f[key]
    doc["keyframe_worlds"] = {"fps": {t.name: t.fps for t in trajectories}}
    doc["frames"] = frames
    return [_write_text(path, json.dumps(doc, indent=1) + "\n")]


# --- COLMAP (text and binary; the files themselves are colmap.py's) ----------------------

_FPS_COMMENT = "keyframe-worlds fps "
_IMAGE_COMMENT = re.compile(r"^keyframe-worlds image (\d+) frame=(-?\d+) camera=(.+)$")


@dataclass
class _ColmapExtras:
    """What COLMAP's files have no field for: each camera's fps, and the camera and frame of images with their own names."""

    fps: dict[str, float]
    images: dict[int, tuple[str, str, int]]  # image id -> (NAME, camera, frame)

    def comments(self) -> list[str]:
        lines = [f"{_FPS_COMMENT}{name}={fps!r}" for name, fps in self.fps.items()]
        lines += [f"keyframe-worlds image {image_id} frame={frame} camera={json.dumps(camera)}"
                  for image_id, (_, camera, frame) in self.images.items()]
        return lines

    @classmethod
    def from_comments(cls, comments: Sequence[str]) -> "_ColmapExtras":
        extras = cls({}, {})
        for line in comments:
            if line.startswith(_FPS_COMMENT):
                name, _, value = line[len(_FPS_COMMENT):].rpartition("=")
                try:
                    extras.fps[name] = float(value)
                except ValueError:
                    continue  # someone else's comment that happens to start alike
            elif match := _IMAGE_COMMENT.match(line):
                try:
                    camera = json.loads(match.group(3))
                except json.JSONDecodeError:
                    continue
                extras.images[int(match.group(1))] = (None, str(camera), int(match.group(2)))
        return extras

    def to_json(self) -> dict:
        return {"format": COLMAP_EXTRAS_TAG, "version": 1, "fps": self.fps,
                "images": [{"image_id": i, "name": n, "camera": c, "frame": f} for i, (n, c, f) in self.images.items()]}

    @classmethod
    def read_sidecar(cls, folder: Path) -> "_ColmapExtras":
        path = folder / COLMAP_EXTRAS_FILE
        if not path.is_file():
            return cls({}, {})
        doc = read_json(path, "COLMAP extras file")
        try:
            if doc.get("format") != COLMAP_EXTRAS_TAG or doc.get("version") != 1:
                raise ValueError
            return cls({str(k): float(v) for k, v in doc.get("fps", {}).items()},
                       {int(e["image_id"]): (str(e["name"]), str(e["camera"]), int(e["frame"])) for e in doc.get("images", [])})
        except (AttributeError, KeyError, TypeError, ValueError):
            raise KeyframeWorldsError(f"{path}: not a {COLMAP_EXTRAS_TAG} version 1 file") from None


def read_colmap(path: Path, binary: bool = False) -> TrajectorySet:
    """A COLMAP model folder (or one of its files): every image as a trajectory frame, and the points with their tracks."""
    folder = path if path.is_dir() else path.parent
    model = colmap.read_model(folder, binary)
    what = "images.bin" if binary else "images.txt"
    cams: dict[int, tuple] = {}
    for cam in model.cameras:
        if cam.camera_id in cams:
            raise KeyframeWorldsError(f"{'cameras.bin' if binary else 'cameras.txt'}: camera id {cam.camera_id} appears twice")
        cams[cam.camera_id] = _colmap_to_intrinsics(cam)
    extras = _ColmapExtras.read_sidecar(folder) if binary else _ColmapExtras.from_comments(model.image_comments)
    entries, view_of_image, seen = [], {}, {}
    for index, im in enumerate(model.images):
        if im.camera_id not in cams:
            raise KeyframeWorldsError(f"{what}: image {im.image_id} names camera id {im.camera_id}, which is not in the cameras file")
        w2c = np.eye(4)
        w2c[:3, :3] = cameras.quaternion_wxyz_to_rotation(np.array(im.qvec))
        w2c[:3, 3] = im.tvec
        known = extras.images.get(im.image_id)
        if known is not None and known[0] in (None, im.name):
            camera, number = known[1], known[2]
        else:
            camera, number = _parse_image_name(im.name, folder.name or "camera", index)
        if (camera, number) in seen:
            raise KeyframeWorldsError(f"{what}: images {seen[camera, number]} and {im.image_id} are both camera {camera!r} frame {number}")
        seen[camera, number] = im.image_id
        fx, fy, cx, cy, w, h, distortion = cams[im.camera_id]
        image = None if im.name == _image_name(camera, number) else im.name
        entries.append(_Frame(camera, number, cameras.w2c_to_c2w(w2c), (fx, fy, cx, cy, w, h), distortion, image))
        view_of_image[im.image_id] = (camera, number)
    if not entries:
        raise KeyframeWorldsError(f"{folder / what}: no images")
    trajectories = tuple(_group_sorted(entries, extras.fps))
    order = {(t.name, int(f)): n for n, (t, f) in enumerate((t, f) for t in trajectories for f in t.frames)}
    return TrajectorySet(trajectories, _colmap_to_points(model, view_of_image, order, what))


def _colmap_to_intrinsics(cam: colmap.ColmapCamera) -> tuple:
    """``(fx, fy, cx, cy, width, height, distortion)`` of a COLMAP camera (PINHOLE: no distortion)."""
    lens = LENS_MODELS[cam.model]
    if lens.single_focal:
        (f, cx, cy), rest = cam.params[:3], cam.params[3:]
        fx = fy = f
    else:
        (fx, fy, cx, cy), rest = cam.params[:4], cam.params[4:]
    return fx, fy, cx, cy, cam.width, cam.height, None if cam.model == "PINHOLE" else Distortion(cam.model, rest)


def _colmap_to_points(model: colmap.ColmapModel, view_of_image: dict[int, tuple[str, int]], order: dict[tuple[str, int], int],
                      what: str) -> SparsePoints | None:
    """The model's points with tracks naming ``(camera, frame)``; None when it has no points and no 2D features.

    Views come in trajectory order (``order``), not the file's image order, so
    that reading what we wrote gives the same points whatever order COLMAP kept.
    """
    pts = model.points
    with_keypoints = sorted((im for im in model.images if len(im.xy)), key=lambda im: order[view_of_image[im.image_id]])
    if not len(pts.ids) and not with_keypoints:
        return None
    views = [view_of_image[im.image_id] for im in with_keypoints]
    index = {im.image_id: v for v, im in enumerate(with_keypoints)}
    unknown = sorted(set(pts.track_image_ids.tolist()) - set(index))
    if unknown:
        raise KeyframeWorldsError(f"points3D: tracks name image {unknown[0]}, which is not in {what} (or has no 2D points)")
    track_views = np.array([index[i] for i in pts.track_image_ids.tolist()], np.int64)
    try:
        return SparsePoints(pts.xyz, pts.rgb, pts.error, pts.ids, pts.track_offsets, track_views, pts.track_point2d,
                            tuple(views), tuple(im.xy for im in with_keypoints))
    except KeyframeWorldsError as exc:
        raise KeyframeWorldsError(f"points3D: {exc}") from None


def _intrinsics_to_colmap(traj: Trajectory, i: int, fmt: str) -> tuple[str, tuple[float, ...]]:
    """COLMAP's model name and full parameter list for frame ``i``."""
    d = traj.distortion[i]
    fx, fy, cx, cy = (float(v[i]) for v in (traj.fx, traj.fy, traj.cx, traj.cy))
    if d is None:
        return "PINHOLE", (fx, fy, cx, cy)
    if d.lens.single_focal:
        if fx != fy:
            raise _cannot_hold(traj, i, fmt, f"it has one focal length, but fx={fx!r} and fy={fy!r}")
        return d.model, (fx, cx, cy) + d.params
    return d.model, (fx, fy, cx, cy) + d.params


def write_colmap(tset: TrajectorySet, path: Path, binary: bool = False) -> list[Path]:
    fmt = "colmap-binary" if binary else "colmap"
    names = colmap.BINARY_FILES if binary else colmap.TEXT_FILES
    folder = path.parent if path.name in names else path
    keys = [(t.name, int(f)) for t in tset.trajectories for f in t.frames]
    points = tset.points.select_views(set(keys)) if tset.points is not None else None
    view_index = {v: i for i, v in enumerate(points.views)} if points is not None else {}
    point_of_keypoint = points.keypoint_points() if points is not None else ()
    cam_ids: dict[tuple, int] = {}
    cams, images = [], []
    extras = _ColmapExtras({t.name: t.fps for t in tset.trajectories}, {})
    for traj in tset.trajectories:
        w2c = cameras.c2w_to_w2c(traj.c2w_opencv)
        q = cameras.rotation_to_quaternion_wxyz(w2c[:, :3, :3])
        for i in range(len(traj)):
            # One COLMAP camera per distinct lens, so animated lenses survive.
            model, params = _intrinsics_to_colmap(traj, i, fmt)
            key = (traj.width, traj.height, model, params)
            if key not in cam_ids:
                cam_ids[key] = len(cam_ids) + 1
                cams.append(colmap.ColmapCamera(cam_ids[key], model, traj.width, traj.height, params))
            image_id = len(images) + 1
            frame = int(traj.frames[i])
            name = traj.images[i] or _image_name(traj.name, frame)
            if traj.images[i] is not None:
                extras.images[image_id] = (name, traj.name, frame)
            v = view_index.get((traj.name, frame))
            if v is None:
                xy, ids = np.zeros((0, 2)), np.zeros(0, np.int64)
            else:
                # COLMAP's POINTS2D name the 3D point of each keypoint: rebuilt from the tracks.
                xy, observed = points.keypoints[v], point_of_keypoint[v] >= 0
                ids = np.full(len(xy), -1, np.int64)
                ids[observed] = points.ids[point_of_keypoint[v][observed]]
            images.append(colmap.ColmapImage(image_id, tuple(q[i].tolist()), tuple(w2c[i, :3, 3].tolist()), cam_ids[key], name, xy, ids))
    if points is None:
        cpoints = colmap.ColmapPoints.empty()
    else:
        image_id_of = {key: n + 1 for n, key in enumerate(keys)}
        image_of_view = np.array([image_id_of[v] for v in points.views], np.int64)
        cpoints = colmap.ColmapPoints(points.ids, points.xyz, points.rgb, points.error, points.track_offsets,
                                      image_of_view[points.track_views], points.track_keypoints)
    model = colmap.ColmapModel(tuple(cams), tuple(images), cpoints, () if binary else tuple(extras.comments()))
    written = colmap.write_model(model, folder, binary)
    if binary:
        written.append(_write_text(folder / COLMAP_EXTRAS_FILE, json.dumps(extras.to_json(), indent=1) + "\n"))
    return written


# --- pano_bank (upstream WorldStereo's panorama memory bank) ------------------------

PANO_BANK_FOLDER = "pano_bank"
PANO_BANK_CAMERAS = "cameras.json"
PANO_BANK_KEY = re.compile(r"^[0-9]+$")
#: Our own entry in a bank's cameras.json (not a view key, so upstream never looks it up): the camera's name and fps.
PANO_BANK_EXTRAS_KEY = "keyframe_worlds"


def _is_pano_bank(path: Path) -> bool:
    return (path / PANO_BANK_CAMERAS).is_file() and (path / "images").is_dir()


def _pano_bank_files(path: Path) -> list[Path]:
    """The ``cameras.json`` of a bank folder, of the scene folder holding ``pano_bank/``, or of each camera's bank
    in a folder of them (``<camera>/cameras.json``, as several cameras are written); empty if none."""
    if _is_pano_bank(path):
        return [path / PANO_BANK_CAMERAS]
    return sorted(sub / PANO_BANK_CAMERAS for sub in path.iterdir() if sub.is_dir() and _is_pano_bank(sub))


def _pano_bank_file(path: Path) -> Path | None:
    files = _pano_bank_files(path)
    return files[0] if files else None


def _pano_bank_image(key: str) -> str:
    """Where a bank keeps view ``key``'s image, relative to the bank folder (upstream's reader looks there)."""
    return f"images/{key}.png"


def read_pano_bank(path: Path) -> list[Trajectory]:
    """A bank folder (``pano_bank/``), the scene folder holding it, its ``cameras.json``, or a folder of banks.

    One camera per bank, a frame per view key in key order. Frame numbers, image paths and the size are the entry's
    ``frame``, ``image`` and ``width``/``height`` when we wrote them; in upstream's banks the key's number, the
    bank's ``images/<key>.png`` (relative to the bank folder), and that image's size (else ``2 * (cx, cy)``).
    """
    if path.is_file():
        files = [path]
    else:
        files = _pano_bank_files(path)
        if not files:
            raise KeyframeWorldsError(f"{path}: no pano_bank (cameras.json with an images/ folder beside it)")
    if len(files) > 1:
        return [t for f in files for t in read_pano_bank(f)]
    file = files[0]
    doc = read_json(file, "pano_bank cameras.json")
    if not isinstance(doc, dict):
        raise KeyframeWorldsError(f"{file}: must be an object keyed by view (\"0000\", \"0001\", ...)")
    keys = sorted((k for k in doc if PANO_BANK_KEY.match(k)), key=int)
    if not keys:
        raise KeyframeWorldsError(f"{file}: no views (keys \"0000\", \"0001\", ...)")
    extras = doc.get(PANO_BANK_EXTRAS_KEY) if isinstance(doc.get(PANO_BANK_EXTRAS_KEY), dict) else {}
    name = str(extras.get("name") or (file.parent.name if file.parent.name != PANO_BANK_FOLDER else PANO_BANK_FOLDER))
    entries = []
    for key in keys:
        entry = doc[key]
        if not isinstance(entry, dict) or "extrinsic" not in entry or "intrinsic" not in entry:
            raise KeyframeWorldsError(f"{file}: view {key!r} needs 'extrinsic' and 'intrinsic'")
        w2c = _matrix(entry["extrinsic"], (4, 4), f"{file.name}: {key}.extrinsic")
        k = _matrix(entry["intrinsic"], (3, 3), f"{file.name}: {key}.intrinsic")
        image = entry["image"] if "image" in entry else _pano_bank_image(key)
        if image is not None and not isinstance(image, str):
            raise KeyframeWorldsError(f"{file}: view {key!r}: 'image' must be a path or null")
        frame = entry.get("frame", int(key))
        if not isinstance(frame, int) or isinstance(frame, bool):
            raise KeyframeWorldsError(f"{file}: view {key!r}: 'frame' must be an integer")
        if "width" in entry and "height" in entry:
            size = (int(entry["width"]), int(entry["height"]))
        elif (info := image_info(file.parent / _pano_bank_image(key))) is not None:
            size = (info[1], info[2])
        else:
            size = (int(round(2 * k[0, 2])), int(round(2 * k[1, 2])))
        entries.append(_Frame(name, frame, cameras.w2c_to_c2w(w2c), (k[0, 0], k[1, 1], k[0, 2], k[1, 2], *size), None, image))
    return _group_sorted(entries, {name: float(extras.get("fps", WORLDSTEREO_DEFAULT_FPS))})


def write_pano_bank(trajectories: list[Trajectory], path: Path) -> list[Path]:
    """``path/cameras.json`` for one camera (``path`` is the bank folder; a ``cameras.json`` path names it), or
    ``path/<camera>/cameras.json`` each for several. Views are keyed ``0000``, ``0001``, ... in frame order; each
    entry also holds its frame number, image path (null for none), width and height, which upstream ignores. The
    images themselves are the views' own files: a bank for upstream needs them as ``images/<key>.png``."""
    for traj in trajectories:
        for i, d in enumerate(traj.distortion):
            if d is not None and not d.is_pinhole:
                raise _cannot_hold(traj, i, "pano_bank", "a bank holds pinhole cameras only (undistort first)")
    if len(trajectories) == 1:
        targets = [(trajectories[0], path if path.name == PANO_BANK_CAMERAS else path / PANO_BANK_CAMERAS)]
    else:
        targets = [(t, path / t.name / PANO_BANK_CAMERAS) for t in trajectories]
    written = []
    for traj, target in targets:
        doc: dict[str, Any] = {PANO_BANK_EXTRAS_KEY: {"name": traj.name, "fps": traj.fps}}
        for i in range(len(traj)):
            doc[f"{i:04d}"] = {"intrinsic": traj.k[i].tolist(), "extrinsic": cameras.c2w_to_w2c(traj.c2w_opencv[i]).tolist(),
                               "frame": int(traj.frames[i]), "image": traj.images[i],
                               "width": traj.width, "height": traj.height}
        (target.parent / "images").mkdir(parents=True, exist_ok=True)
        written.append(_write_text(target, json.dumps(doc, indent=1) + "\n"))
    return written
